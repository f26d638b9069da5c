"""The OPA engine against real OPA servers (``make opa``).

The same questions as tests/policy/test_embedded_engine.py asks of the
embedded engine, and the OPA-only ones: does the gateway prove which policy OPA
holds, and does a stopped, hung, failing or empty OPA always come back as a
deny within the timeout? The "hung OPA" is a small TCP proxy on 127.0.0.1 in
front of a real OPA that, once stalled, takes requests and never answers.

The shipped policy is served as production serves it, by an OPA that loaded
``policies/`` itself (``load=False``); tests that change what OPA holds get
a server of their own.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from opa_client import AsyncOpaClient

from gateway.policy import (
    POLICY_ERROR,
    POLICY_UNAVAILABLE,
    Decision,
    EmbeddedPolicyEngine,
    OpaPolicyEngine,
    PolicyEngine,
    PolicyLoadError,
    PolicyUnavailable,
    open_policy_engine,
    policy_revision,
)
from gateway.policy.opa import MAX_QUERIES, OpaAddress
from gateway.policy.opa_query import summary
from gateway.settings import Settings
from tests.opa_fixtures import POLICY_DIR, OpaServer
from tests.policy.embedded_fixtures import write_policy

pytestmark = pytest.mark.anyio

TIMEOUT_S = 5.0
#: For the tests that wait for a timeout on purpose.
SHORT_TIMEOUT_S = 0.3

ALLOW = '{"allow": true, "reasons": [], "obligations": {"max_tokens": 7, "prompt_logging": "full"}}'

# Minutes of work if left alone (10^12 products); only when the input asks,
# so that loading stays quick.
SLOW_WHEN_ASKED = f"""
slow_count := count([p |
	some i in numbers.range(1, 1000000)
	some j in numbers.range(1, 1000000)
	p := i * j
])

decision := {ALLOW} if not input.slow

decision := {ALLOW} if {{
	input.slow
	slow_count > 0
}}

visible_models := set()
"""


def request_input(roles: Any, model: str = "govgate-tiny", max_tokens: Any = 100) -> dict[str, Any]:
    """A policy input as the gateway builds it (docs/architecture.md, "Policy input")."""
    return {
        "principal": {"id": "u-1", "team": "t-1", "roles": roles, "key_id": "k-1"},
        "request": {"endpoint": "chat.completions", "model": model, "messages": [{"role": "user", "content": "hi"}],
                    "text": "hi", "max_tokens": max_tokens, "stream": False, "purpose": None},
        "model": {"name": model, "family": "llama", "context_length": 512, "tags": []},
        "time": {"now_ns": 1_700_000_000_000_000_000, "hour_utc": 12, "weekday": "Tuesday"},
    }


def model_views(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "family": "llama", "context_length": 512, "tags": []} for n in names]


def codes(decision: Decision) -> list[str]:
    return [reason.code for reason in decision.reasons]


def raw_client(url: str) -> AsyncOpaClient:
    """A plain client for changing OPA behind the engine's back."""
    address = OpaAddress.parse(url)
    return AsyncOpaClient(host=address.host, port=address.port, retries=0)


# Two modules that use each other: a.rego calls b.rego's function, b.rego reads a.rego's rule.
CYCLIC = {
    "a.rego": 'package govgate\n\ndecision := {"allow": true, "reasons": [], '
              '"obligations": {"max_tokens": tokens(input), "prompt_logging": "full"}}\n\nlimit := 10\n',
    "b.rego": 'package govgate\n\ntokens(x) := min([object.get(x, "max_tokens", 1), limit])\n\n'
              'visible_models := {m.name | some m in input.models}\n',
}


@pytest.fixture
async def opa(opa_policy_server: str) -> AsyncIterator[OpaPolicyEngine]:
    """The OPA engine on the shared OPA that loaded ``policies/`` itself (leave that OPA as it is)."""
    engine = await OpaPolicyEngine.connect(opa_policy_server, POLICY_DIR, TIMEOUT_S, load=False)
    try:
        yield engine
    finally:
        await engine.aclose()


class StallingProxy:
    """A TCP proxy on 127.0.0.1 in front of OPA; once stalled it reads requests and never answers.

    Also counts the POSTs it forwards, to see whether a client retried. With
    ``answer`` set it answers every request itself with those bytes (a load
    balancer whose OPA is gone).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.stalled = False
        self.answer: bytes | None = None
        self.posts = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream_writer = None
        try:
            up_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(upstream_writer)
            await asyncio.gather(self._pipe(reader, upstream_writer, count=True, client=writer),
                                 self._pipe(up_reader, writer, count=False))
        except OSError:
            pass
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool,
                    client: asyncio.StreamWriter | None = None) -> None:
        while chunk := await reader.read(65536):
            if count:
                self.posts += chunk.count(b"POST /v1/data")
                if self.answer is not None and client is not None:
                    client.write(self.answer)
                    await client.drain()
                    continue
            elif self.stalled:
                continue  # OPA answered; the client never hears it
            writer.write(chunk)
            await writer.drain()
        writer.close()


# ---------------------------------------------------------------- the shipped policy through OPA


async def test_opa_engine_is_a_policy_engine(opa: OpaPolicyEngine) -> None:
    assert isinstance(opa, PolicyEngine)


async def test_allow_deny_and_clamp_through_opa(opa: OpaPolicyEngine) -> None:
    allowed = await opa.decide(request_input(["analyst"], max_tokens=100))
    clamped = await opa.decide(request_input(["analyst"], max_tokens=1000))
    admin = await opa.decide(request_input(["admin"], "big", max_tokens=100_000))
    other_model = await opa.decide(request_input(["analyst"], "big"))
    stranger = await opa.decide(request_input(["stranger"]))
    assert allowed.allow and allowed.obligations.max_tokens == 100
    assert allowed.obligations.prompt_logging == "full"
    assert clamped.allow and clamped.obligations.max_tokens == 256
    assert admin.allow and admin.obligations.max_tokens == 4096
    assert not other_model.allow and codes(other_model) == ["model_not_allowed"]
    assert "'big'" in other_model.reasons[0].message
    assert not stranger.allow and codes(stranger) == ["unknown_role"]


async def test_visible_models_through_opa(opa: OpaPolicyEngine) -> None:
    views = model_views("govgate-tiny", "big")
    principal = request_input([])["principal"]
    assert await opa.visible_models({**principal, "roles": ["admin"]}, views) == {"govgate-tiny", "big"}
    assert await opa.visible_models({**principal, "roles": ["analyst"]}, views) == {"govgate-tiny"}
    assert await opa.visible_models({**principal, "roles": ["stranger"]}, views) == set()


async def test_concurrent_decisions_get_their_own_answers(opa: OpaPolicyEngine) -> None:
    cases = [(["analyst"], "govgate-tiny", 50, (True, 50)), (["analyst"], "govgate-tiny", 900, (True, 256)),
             (["analyst"], "big", 50, (False, 0)), (["admin"], "big", 5000, (True, 4096))] * 50
    decisions = await asyncio.gather(*(opa.decide(request_input(r, m, t)) for r, m, t, _ in cases))
    assert [(d.allow, d.obligations.max_tokens) for d in decisions] == [expected for *_, expected in cases]


async def test_decision_latency_through_opa(opa: OpaPolicyEngine, capsys: pytest.CaptureFixture[str]) -> None:
    """Prints what a decision costs through OPA over loopback HTTP (no timing assertion)."""
    inputs = [request_input(["analyst"], max_tokens=n) for n in range(1, 501)]
    await opa.decide(inputs[0])  # the first request opens the connection
    latencies = []
    for item in inputs:
        started = time.perf_counter()
        await opa.decide(item)
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    concurrent = await asyncio.gather(*(opa.decide(i) for i in inputs))
    per_decision = (time.perf_counter() - started) / len(inputs)
    cuts = statistics.quantiles(latencies, n=100)
    with capsys.disabled():
        print(f"\n[policy cost] OPA decide over HTTP: p50 {cuts[49] * 1e3:.2f} ms, p99 {cuts[98] * 1e3:.2f} ms "
              f"sequential ({len(inputs)}); {per_decision * 1e3:.2f} ms/decision with {len(inputs)} concurrent")
    assert [d.obligations.max_tokens for d in concurrent] == list(range(1, 257)) + [256] * 244


# ---------------------------------------------------------------- which policy OPA holds


async def test_revision_is_the_embedded_engines(opa: OpaPolicyEngine) -> None:
    """OPA also loaded the *_test.rego modules beside the policy; they are not part of the revision."""
    embedded = EmbeddedPolicyEngine.load(POLICY_DIR, TIMEOUT_S)
    try:
        assert opa.revision == embedded.revision == policy_revision(POLICY_DIR)
    finally:
        await embedded.aclose()
    assert await opa.remote_revision() == opa.revision


async def test_module_changed_on_opa_is_refused_with_both_revisions(
        start_opa: Callable[..., OpaServer]) -> None:
    server = start_opa(POLICY_DIR)
    local = policy_revision(POLICY_DIR)
    engine = await OpaPolicyEngine.connect(server.url, POLICY_DIR, TIMEOUT_S, load=False)
    try:
        async with raw_client(server.url) as client:
            pid = next(p for p in sorted(await client.get_policies_list()) if not p.endswith("_test.rego"))
            text = (await client.get_policy(pid))["result"]["raw"]
            await client.update_policy_from_string(text + "\n# edited on OPA\n", pid, rego_compat=False)
        remote = await engine.remote_revision()
        assert remote != local
        with pytest.raises(PolicyLoadError, match=f"holds policy revision {remote}, but .* is revision {local}") as err:
            await OpaPolicyEngine.connect(server.url, POLICY_DIR, TIMEOUT_S, load=False)
        assert f"modules that differ: {Path(pid).name}" in str(err.value)

        # The engine already serving finds out when it checks, and then denies rather than misrecord.
        with pytest.raises(PolicyLoadError, match=local):
            await engine.verify()
        decision = await engine.decide(request_input(["analyst"]))
        assert codes(decision) == [POLICY_ERROR] and local in decision.reasons[0].message

        # Loading the folder puts the module back (in place, under OPA's own id), and the check passes again.
        await (await OpaPolicyEngine.connect(server.url, POLICY_DIR, TIMEOUT_S, load=True)).aclose()
        assert await engine.verify() == local
        assert (await engine.decide(request_input(["analyst"]))).allow
    finally:
        await engine.aclose()


async def test_gateway_notices_opa_changing_policy_behind_an_unchanged_folder(
        start_opa: Callable[..., OpaServer]) -> None:
    """OPA restarted with another policy (or, under --watch, holding a change the gateway refused):
    the next poll of the reloader proves the revision again and denies rather than record decisions
    of another policy under the folder's revision; an OPA that cannot be reached stays "unavailable"."""
    from gateway.policy.reloader import ReloadingPolicyEngine

    server = start_opa(POLICY_DIR)
    engine = await OpaPolicyEngine.connect(server.url, POLICY_DIR, TIMEOUT_S, load=False)
    reloading = ReloadingPolicyEngine(engine, lambda: OpaPolicyEngine.connect(server.url, POLICY_DIR, TIMEOUT_S,
                                                                               load=False), policy_dir=POLICY_DIR)
    card = request_input(["analyst"])
    card["request"]["text"] = card["request"]["normalized_text"] = "card 4111 1111 1111 1111"
    try:
        assert codes(await reloading.decide(card)) == ["pii_detected"]
        assert await reloading.readiness_problem() is None  # /readyz: the policy can decide
        async with raw_client(server.url) as client:
            config = (await client.get_data("govgate_config"))["result"]
            config["content"]["detectors"]["payment_card"]["action"] = "redact"
            await client.update_or_create_data(config, "govgate_config")
        assert not (await reloading.reload()).changed
        decision = await reloading.decide(card)
        assert codes(decision) == [POLICY_ERROR] and engine.revision in decision.reasons[0].message
        # a decision's reasons reach the client and the audit chain: neither OPA's address nor the folder's
        # path nor what differs (probe s59 G4); the gateway's log says those
        said = decision.reasons[0].message
        assert server.url.split("//")[1] not in said and str(POLICY_DIR) not in said, said
        assert "payment_card" not in said and "govgate_config" not in said, said
        problem = await reloading.readiness_problem()
        assert problem is not None and problem.startswith(f"OPA does not hold revision {engine.revision}")
        # /readyz answers anyone: no address of OPA, no path of the folder, no policy data in it.
        assert server.url.split("//")[1] not in problem and str(POLICY_DIR) not in problem, problem
        assert "payment_card" not in problem and "redact" not in problem, problem

        async with raw_client(server.url) as client:  # OPA holds the folder's policy again
            config["content"]["detectors"]["payment_card"]["action"] = "deny"
            await client.update_or_create_data(config, "govgate_config")
        await reloading.reload()
        assert codes(await reloading.decide(card)) == ["pii_detected"]
        assert await reloading.readiness_problem() is None
        server.stop()  # unreachable: no verdict on its policy, so decisions stay unavailable, not denied
        await reloading.reload()
        decision = await reloading.decide(card)
        assert codes(decision) == [POLICY_UNAVAILABLE] and decision.is_unavailable
        assert "127.0.0.1" not in decision.reasons[0].message and server.url.split("//")[1] not in \
            decision.reasons[0].message, decision.reasons[0].message
        problem = await reloading.readiness_problem()
        assert problem is not None and problem.startswith("OPA does not answer its health check"), problem
        assert server.url.split("//")[1] not in problem and "127.0.0.1" not in problem, problem
    finally:
        await reloading.aclose()


async def test_data_changed_on_opa_is_refused(start_opa: Callable[..., OpaServer]) -> None:
    server = start_opa(POLICY_DIR)
    async with raw_client(server.url) as client:
        config = (await client.get_data("govgate_config"))["result"]
        config["roles"]["analyst"]["max_tokens"] = 100_000
        await client.update_or_create_data(config, "govgate_config")
    with pytest.raises(PolicyLoadError, match="data that differs: data.govgate_config"):
        await OpaPolicyEngine.connect(server.url, POLICY_DIR, TIMEOUT_S, load=False)


async def test_load_makes_opa_hold_exactly_the_folder(opa_server: str, tmp_path: Path) -> None:
    async with raw_client(opa_server) as client:
        await client.update_policy_from_string("package elsewhere\n\nx := 1\n", "extra.rego", rego_compat=False)
    folder = write_policy(tmp_path, f"decision := {ALLOW}\nvisible_models := set()\n", {"extra": {"on": True}})
    engine = await OpaPolicyEngine.connect(opa_server, folder, TIMEOUT_S)
    await engine.aclose()
    async with raw_client(opa_server) as client:
        assert await client.get_policies_list() == ["policy.rego"]
        assert (await client.get_data("extra"))["result"] == {"on": True}
    assert engine.revision == policy_revision(folder)


async def test_modules_using_each_other_cannot_be_uploaded_into_an_empty_opa(
        start_opa: Callable[..., OpaServer], tmp_path: Path) -> None:
    for name, text in CYCLIC.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(PolicyLoadError, match="undefined function tokens.*connect with load=False"):
        await OpaPolicyEngine.connect(start_opa().url, tmp_path, TIMEOUT_S)
    # An OPA that loaded the folder itself serves it, and the gateway can upload over it.
    server = start_opa(tmp_path)
    engine = await OpaPolicyEngine.connect(server.url, tmp_path, TIMEOUT_S, load=True)
    try:
        assert (await engine.decide({"max_tokens": 50})).obligations.max_tokens == 10
        (tmp_path / "a.rego").write_text(CYCLIC["a.rego"].replace("limit := 10", "limit := 20"))
        await engine.reload()
        assert (await engine.decide({"max_tokens": 50})).obligations.max_tokens == 20
    finally:
        await engine.aclose()


async def test_module_opa_refuses_is_a_load_error_never_rewritten(opa_server: str, tmp_path: Path) -> None:
    """Old Rego syntax: opa-python-client's rego_compat would rewrite it and upload the rewrite."""
    folder = write_policy(tmp_path, "decision := {}\nvisible_models := set()\nold_style { true }\n")
    with pytest.raises(PolicyLoadError, match="`if` keyword is required"):
        await OpaPolicyEngine.connect(opa_server, folder, TIMEOUT_S)
    async with raw_client(opa_server) as client:
        for pid in await client.get_policies_list():
            assert "old_style" not in (await client.get_policy(pid))["result"]["raw"]


async def test_policy_without_decision_rule_is_refused(opa_server: str, tmp_path: Path) -> None:
    folder = write_policy(tmp_path, "visible_models := set()\n")
    with pytest.raises(PolicyLoadError, match="defines no rule data.govgate.decision"):
        await OpaPolicyEngine.connect(opa_server, folder, TIMEOUT_S)


async def test_reload_pushes_a_new_policy_and_keeps_the_old_one_on_error(
        start_opa: Callable[..., OpaServer], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(POLICY_DIR, tmp_path / "policies"))
    engine = await OpaPolicyEngine.connect(start_opa(folder).url, folder, TIMEOUT_S, load=True)
    try:
        first = engine.revision
        data = json.loads((folder / "data.json").read_text())
        data["govgate_config"]["roles"]["analyst"]["max_tokens"] = 512
        (folder / "data.json").write_text(json.dumps(data))
        second = await engine.reload()
        assert second != first and engine.revision == second == policy_revision(folder)
        assert (await engine.decide(request_input(["analyst"], max_tokens=1000))).obligations.max_tokens == 512

        (folder / "broken.rego").write_text("package govgate\n\ndecision := {\n")
        with pytest.raises(PolicyLoadError, match="broken.rego"):
            await engine.reload()
        assert engine.revision == second
        assert await engine.remote_revision() == second  # the previous policy was put back
        assert (await engine.decide(request_input(["analyst"], max_tokens=1000))).obligations.max_tokens == 512
    finally:
        await engine.aclose()


async def test_unreachable_opa_is_a_load_error() -> None:
    with pytest.raises(PolicyLoadError, match="did not answer /health"):
        await OpaPolicyEngine.connect("http://127.0.0.1:9", POLICY_DIR, TIMEOUT_S, ready_timeout_s=0.2)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8181", OpaAddress("127.0.0.1", 8181, False)),
        ("http://opa:8181/", OpaAddress("opa", 8181, False)),
        ("https://opa.example", OpaAddress("opa.example", 443, True)),
        ("http://[::1]:8181", OpaAddress("[::1]", 8181, False)),
    ],
)
def test_opa_url_parsed_for_the_client(url: str, expected: OpaAddress) -> None:
    assert OpaAddress.parse(url) == expected


@pytest.mark.parametrize("url", ["opa:8181", "ftp://opa", "http://opa:8181/v1", "http://u:p@opa", "http://opa:x"])
def test_opa_url_the_client_cannot_use_is_refused(url: str) -> None:
    with pytest.raises(PolicyLoadError):
        OpaAddress.parse(url)


async def test_factory_opens_opa_when_configured(opa_policy_server: str) -> None:
    engine = await open_policy_engine(Settings(opa_url=opa_policy_server, policy_dir=POLICY_DIR))
    try:
        assert isinstance(engine, OpaPolicyEngine) and engine.url == opa_policy_server
    finally:
        await engine.aclose()


async def test_factory_opens_embedded_engine_without_opa_url() -> None:
    engine = await open_policy_engine(Settings(opa_url="", policy_dir=POLICY_DIR))
    try:
        assert isinstance(engine, EmbeddedPolicyEngine)
    finally:
        await engine.aclose()


# ---------------------------------------------------------------- failing closed


async def test_stopped_opa_is_unavailable_within_the_timeout(start_opa: Callable[..., OpaServer]) -> None:
    server = start_opa(POLICY_DIR)
    engine = await OpaPolicyEngine.connect(server.url, POLICY_DIR, SHORT_TIMEOUT_S, load=False)
    try:
        assert (await engine.decide(request_input(["analyst"]))).allow
        server.stop()
        started = time.monotonic()
        decision = await engine.decide(request_input(["analyst"]))
        elapsed = time.monotonic() - started
        with pytest.raises(PolicyUnavailable, match="cannot reach the policy server") as refused:  # a 503 for
            # GET /v1/models, not []
            await engine.visible_models(request_input([])["principal"], model_views("govgate-tiny"))
        assert server.url.split("//")[1] not in str(refused.value)
    finally:
        await engine.aclose()
    assert codes(decision) == [POLICY_UNAVAILABLE] and not decision.allow and decision.is_unavailable
    assert "cannot reach the policy server (OPA)" in decision.reasons[0].message
    assert server.url.split("//")[1] not in decision.reasons[0].message  # the log has it (probe s59 G4)
    assert decision.obligations.prompt_logging == "hash"
    assert elapsed < SHORT_TIMEOUT_S


async def test_hung_opa_is_unavailable_not_a_deny(opa_policy_server: str) -> None:
    proxy = StallingProxy(OpaAddress.parse(opa_policy_server).port)
    url = await proxy.start()
    engine = await OpaPolicyEngine.connect(url, POLICY_DIR, SHORT_TIMEOUT_S, load=False)
    try:
        assert (await engine.decide(request_input(["analyst"]))).allow
        proxy.stalled = True
        started = time.monotonic()
        decisions = await asyncio.gather(*(engine.decide(request_input(["analyst"])) for _ in range(5)))
        elapsed = time.monotonic() - started
        proxy.stalled = False
        recovered = await engine.decide(request_input(["analyst"]))
    finally:
        await engine.aclose()
        await proxy.aclose()
    assert all(codes(d) == [POLICY_UNAVAILABLE] and d.is_unavailable for d in decisions)
    assert SHORT_TIMEOUT_S <= elapsed < SHORT_TIMEOUT_S + 1.0
    assert recovered.allow


async def test_waiting_for_a_connection_to_opa_is_bounded_apart(opa_policy_server: str) -> None:
    """The evaluation timeout starts once a connection is free; the wait for one has its own bound."""
    proxy = StallingProxy(OpaAddress.parse(opa_policy_server).port)
    url = await proxy.start()
    engine = await OpaPolicyEngine.connect(url, POLICY_DIR, 2.0, load=False, wait_timeout_s=0.2)
    try:
        assert (await engine.decide(request_input(["analyst"]))).allow
        proxy.stalled = True
        decisions = await asyncio.gather(*(engine.decide(request_input(["analyst"]))
                                           for _ in range(MAX_QUERIES + 1)))
        proxy.stalled = False
        recovered = await engine.decide(request_input(["analyst"]))
    finally:
        await engine.aclose()
        await proxy.aclose()
    assert all(codes(d) == [POLICY_UNAVAILABLE] and d.is_unavailable for d in decisions)
    messages = Counter(d.reasons[0].message for d in decisions)
    assert messages == {"policy evaluation on OPA took longer than 2s": MAX_QUERIES,
                        "no connection to OPA became free within 0.2s": 1}
    assert recovered.allow


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_opa_behind_a_proxy_that_cannot_reach_it_is_unavailable(opa_policy_server: str, status: int) -> None:
    proxy = StallingProxy(OpaAddress.parse(opa_policy_server).port)
    url = await proxy.start()
    engine = await OpaPolicyEngine.connect(url, POLICY_DIR, TIMEOUT_S, load=False)
    try:
        assert (await engine.decide(request_input(["analyst"]))).allow
        proxy.answer = f"HTTP/1.1 {status} Bad Gateway\r\nContent-Length: 0\r\n\r\n".encode()
        decision = await engine.decide(request_input(["analyst"]))
    finally:
        await engine.aclose()
        await proxy.aclose()
    assert codes(decision) == [POLICY_UNAVAILABLE] and decision.is_unavailable
    assert f"HTTP {status}" in decision.reasons[0].message


async def test_slow_policy_on_opa_is_unavailable_not_a_deny(start_opa: Callable[..., OpaServer],
                                                           tmp_path: Path) -> None:
    folder = write_policy(tmp_path, SLOW_WHEN_ASKED)
    engine = await OpaPolicyEngine.connect(start_opa(folder).url, folder, SHORT_TIMEOUT_S, load=False)
    try:
        started = time.monotonic()
        slow = await engine.decide({"slow": True})
        elapsed = time.monotonic() - started
        quick = await engine.decide({})
    finally:
        await engine.aclose()
    assert codes(slow) == [POLICY_UNAVAILABLE] and slow.is_unavailable
    assert elapsed < SHORT_TIMEOUT_S + 1.0
    assert quick.allow


async def test_opa_error_denies_at_once_without_retry(opa_server: str, tmp_path: Path) -> None:
    """OPA answers 500 to an evaluation error; opa-python-client's async client would retry for ~0.9 s."""
    rego = f"""
decision := {ALLOW} if input.a
decision := {{"allow": false, "reasons": [{{"code": "x", "message": "y"}}], "obligations": {{}}}} if input.b
visible_models := set()
"""
    proxy = StallingProxy(OpaAddress.parse(opa_server).port)
    url = await proxy.start()
    engine = await OpaPolicyEngine.connect(url, write_policy(tmp_path, rego), TIMEOUT_S)
    try:
        before = proxy.posts
        started = time.monotonic()
        decision = await engine.decide({"a": True, "b": True})  # both bodies: conflicting values
        elapsed = time.monotonic() - started
    finally:
        await engine.aclose()
        await proxy.aclose()
    assert codes(decision) == [POLICY_ERROR]
    assert "HTTP 500" in decision.reasons[0].message
    assert re.search(r"eval_conflict_error at policy\.rego:\d+", decision.reasons[0].message)  # which rule
    assert proxy.posts - before == 1
    assert elapsed < 0.5


async def test_empty_opa_gives_no_decision_and_denies(start_opa: Callable[..., OpaServer], tmp_path: Path) -> None:
    folder = write_policy(tmp_path, f"decision := {ALLOW}\nvisible_models := {{\"govgate-tiny\"}}\n")
    server = start_opa(folder)
    engine = await OpaPolicyEngine.connect(server.url, folder, TIMEOUT_S, load=False)
    try:
        async with raw_client(server.url) as client:
            for pid in await client.get_policies_list():
                await client.delete_policy(pid)
        decision = await engine.decide(request_input(["analyst"]))
        names = await engine.visible_models(request_input([])["principal"], model_views("govgate-tiny"))
    finally:
        await engine.aclose()
    assert codes(decision) == [POLICY_ERROR] and "no decision" in decision.reasons[0].message
    assert names == set()


async def test_undefined_decision_denied(opa_server: str, tmp_path: Path) -> None:
    folder = write_policy(tmp_path, f"decision := {ALLOW} if input.never\nvisible_models := set()\n")
    engine = await OpaPolicyEngine.connect(opa_server, folder, TIMEOUT_S)
    try:
        decision = await engine.decide({})
    finally:
        await engine.aclose()
    assert codes(decision) == [POLICY_ERROR]


async def test_malformed_decision_denied(opa_server: str, tmp_path: Path) -> None:
    folder = write_policy(tmp_path, 'decision := {"allow": true}\nvisible_models := {1, 2}\n')
    engine = await OpaPolicyEngine.connect(opa_server, folder, TIMEOUT_S)
    try:
        decision = await engine.decide({})
        names = await engine.visible_models({}, model_views("govgate-tiny"))
    finally:
        await engine.aclose()
    assert codes(decision) == [POLICY_ERROR] and "malformed" in decision.reasons[0].message
    assert names == set()


async def test_input_that_is_not_json_denied(opa: OpaPolicyEngine) -> None:
    decision = await opa.decide({**request_input(["analyst"]), "x": float("nan")})
    assert codes(decision) == [POLICY_ERROR] and "not JSON" in decision.reasons[0].message


async def test_closed_engine_denies(opa_policy_server: str) -> None:
    engine = await OpaPolicyEngine.connect(opa_policy_server, POLICY_DIR, TIMEOUT_S, load=False)
    await engine.aclose()
    await engine.aclose()  # twice is harmless
    assert codes(await engine.decide(request_input(["analyst"]))) == [POLICY_ERROR]


async def test_queries_waiting_for_a_connection_are_served_by_team_not_first_come() -> None:
    """All of the session's connections taken: a team that comes late goes ahead of another's backlog,
    and a wait that runs out leaves the line. (No OPA is reached: only the engine's slots are taken and given.)"""
    from gateway.policy.opa_sync import read_snapshot

    address = OpaAddress.parse("http://127.0.0.1:9")
    engine = OpaPolicyEngine(address, "http://127.0.0.1:9", read_snapshot(POLICY_DIR), POLICY_DIR, 2.0, False,
                             wait_timeout_s=60.0)
    for _ in range(MAX_QUERIES):
        assert await engine._slots.take("a", 60.0)
    order: list[str] = []

    async def wait(label: str, team: str) -> None:
        assert await engine._slots.take(team, 60.0)
        order.append(label)

    waiting = []
    for label, team in [("a0", "a"), ("a1", "a"), ("a2", "a"), ("b0", "b")]:
        waiting.append(asyncio.create_task(wait(label, team)))
        await asyncio.sleep(0)  # in line, in this order
    assert engine._slots.waiting() == {"a": 3, "b": 1}
    for _ in waiting:
        engine._slots.give()
    await asyncio.wait_for(asyncio.gather(*waiting), 60)
    assert order == ["a0", "b0", "a1", "a2"]  # first come, first served would have made b0 last
    assert not await engine._slots.take("b", 0.05)  # still none free: busy, and out of the line
    assert engine._slots.waiting() == {}


async def test_a_builtin_error_in_a_denial_denies_not_allows(opa_server: str, tmp_path: Path) -> None:
    """OPA by default reads a builtin error (here a division by zero) as an undefined body, so a denial
    rule that hits one does not fire and the request is allowed; the gateway asks for strict builtin
    errors, which deny with ``policy_error``, as the embedded interpreter does (h10 F2)."""
    rego = f"""
deny if {{
\tinput.zero == 0
\tratio = 10 / input.zero
\tratio > 1
}}
decision := {ALLOW} if not deny
decision := {{"allow": false, "reasons": [{{"code": "x", "message": "y"}}], "obligations": {{}}}} if deny
visible_models := set()
"""
    engine = await OpaPolicyEngine.connect(opa_server, write_policy(tmp_path, rego), TIMEOUT_S)
    try:
        errs = await engine.decide({"zero": 0})
        fine = await engine.decide({"zero": 5})
    finally:
        await engine.aclose()
    assert codes(errs) == [POLICY_ERROR] and "HTTP 500" in errs.reasons[0].message
    assert re.search(r"eval_builtin_error at policy\.rego:\d+", errs.reasons[0].message)  # where, not what
    assert "divide" not in errs.reasons[0].message
    assert fine.allow


def test_an_opa_error_is_summarised_by_its_codes_and_places_never_its_messages() -> None:
    """OPA's messages may quote what a builtin choked on (a prompt's text); the summary goes into the
    audit's reasons, so it holds codes and locations only."""
    body = json.dumps({"code": "internal_error", "message": "error(s) occurred", "errors": [
        {"code": "eval_builtin_error", "message": 'to_number: parsing "my card 4111"',
         "location": {"file": "/srv/policies/custom.rego", "row": 12, "col": 3}},
        {"code": "eval_conflict_error", "message": "complete rules must not produce multiple outputs"},
    ]}).encode()
    assert summary(body) == "eval_builtin_error at custom.rego:12; eval_conflict_error"
    assert summary(b'{"code": "internal_error", "message": "x"}') == "internal_error"
    assert summary(b"<html>bad gateway</html>") == "" and summary(b"[1]") == ""
    assert summary(json.dumps({"errors": [{"code": "a\x1b[2Kb"}]}).encode()) == "a2Kb"


@pytest.mark.parametrize("url", ["http://u:pw-secret@opa", "http://pw-secret@opa:8181", "http://u:pw-secret@opa:x",
                                 "ftp://u:pw-secret@opa"])
def test_a_refused_opa_url_is_quoted_without_its_credentials(url: str) -> None:
    with pytest.raises(PolicyLoadError) as refused:
        OpaAddress.parse(url)
    assert "pw-secret" not in str(refused.value) and "//***@" in str(refused.value)
