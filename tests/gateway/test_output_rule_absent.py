"""A policy revision without an output rule: outputs pass unchecked with no report/verdict round trip.

The gateway asks once per revision whether its policy has an output rule
(``ReloadingPolicyEngine.output_rule_absent``); without one it tells the
worker so in the job, and the worker records the verdict the gateway would
have sent (allow, the whole output served). A revision with an output rule
is still judged: a rule that stops every output stops this one. The
report to the gateway is seen in the commands Redis runs (MONITOR, counting
only those naming the test's own request: the Redis is the session's, which
other processes use too): a non-streamed output is handed over with an
HSETNX of its fallback entry, and a stream's worker waits for its verdict
with BLPOP of the request's verdict key. Without a rule a stream is not held
back either: its first token goes out as it comes.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from tests.conftest import _roomy_limits, bearer, policy_copy, serving
from tests.redis_monitor import CommandLog
from workers.contract.output_check import verdict_key
from workers.contract.pending_terminals import PENDING_KEY
from workers.contract.registry import TINY_MODEL_NAME


BODY = {"model": TINY_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
STOP_ALL = '''package govgate

import rego.v1

output_decision := {"allow": false, "reasons": [{"code": "test_stop", "message": "every output stops"}],
	"obligations": {"redact": []}}
'''


def without_output_rule(folder: Path) -> Path:
    """The shipped policy with its output rule renamed away (its helpers stay: checks.rego uses them)."""
    target = policy_copy(folder, _roomy_limits)
    output = target / "output.rego"
    output.write_text(output.read_text().replace("output_decision :=", "retired_output_decision :=", 1))
    return target


def stopping_every_output(folder: Path) -> Path:
    target = without_output_rule(folder)
    (target / "stop_all.rego").write_text(STOP_ALL)
    return target


def verdict_waits(log: CommandLog, request_id: str) -> int:
    """The request's HSETNX of its fallback and BLPOPs of its verdict: one per output handed over or verdict
    waited for."""
    assert log.naming(request_id), "the log saw none of the request's commands"  # a zero must mean something
    return log.count("hsetnx", PENDING_KEY, request_id) + log.count("blpop", verdict_key(request_id))


async def complete(settings, folder: Path, key: str):
    async with AsyncTestClient(create_app(settings.with_(policy_dir=folder, output_rules=True)),
                               timeout=120) as client:
        return await client.post("/v1/completions", headers=bearer(key), json=BODY)


@pytest.mark.anyio
async def test_no_output_rule_records_the_allow_without_the_round_trip(settings, worker, keyring, audit_store,
                                                                         tmp_path):
    with CommandLog(settings.redis_url) as log:
        response = await complete(settings, without_output_rule(tmp_path), keyring["analyst"])
    assert response.status_code == 200, response.text
    assert verdict_waits(log, response.headers["x-govgate-request-id"]) == 0
    terminal = audit_store.terminal_for(response.headers["x-govgate-request-id"])
    text = response.json()["choices"][0]["text"]
    assert terminal.kind == "completion" and text
    assert terminal.body["output_decision"] == {"allow": True, "reasons": [], "findings": [], "stopped": False,
                                                "policy_revision": terminal.policy_revision}
    assert terminal.payload["client_output"] == terminal.payload["output"] == text


@pytest.mark.anyio
async def test_an_output_rule_is_still_asked_and_can_stop_the_output(settings, worker, keyring, audit_store,
                                                                     tmp_path):
    with CommandLog(settings.redis_url) as log:
        response = await complete(settings, stopping_every_output(tmp_path), keyring["analyst"])
    assert response.status_code == 200, response.text
    assert verdict_waits(log, response.headers["x-govgate-request-id"]) == 1
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["text"] == ""
    terminal = audit_store.terminal_for(response.headers["x-govgate-request-id"])
    decision = terminal.body["output_decision"]
    assert decision["allow"] is False and decision["stopped"] is True
    assert decision["reasons"] == [{"code": "test_stop", "message": "every output stops"}]


# An operator's rule that needs the output's text: undefined on the gateway's probe input, which holds none.
STOP_GIVEN_TEXT = STOP_ALL.replace('"every output stops"}],\n\t"obligations": {"redact": []}}',
                                   '"every output stops"}],\n\t"obligations": {"redact": []}} if {\n'
                                   '\tis_string(input.output.text)\n}')


@pytest.mark.anyio
async def test_an_output_rule_undefined_on_the_probe_is_still_a_rule(settings, worker, keyring, audit_store,
                                                                     tmp_path):
    """The gateway took "undefined on its probe input" for "no output rule", so a rule needing the output's
    text never judged anything: every output was served in full (probe h10, F1). The text defines it."""
    assert STOP_GIVEN_TEXT != STOP_ALL and "is_string(input.output.text)" in STOP_GIVEN_TEXT
    folder = without_output_rule(tmp_path)
    (folder / "stop_given_text.rego").write_text(STOP_GIVEN_TEXT)
    response = await complete(settings, folder, keyring["analyst"])
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["text"] == ""
    decision = audit_store.terminal_for(response.headers["x-govgate-request-id"]).body["output_decision"]
    assert decision["allow"] is False and decision["reasons"] == [{"code": "test_stop",
                                                                   "message": "every output stops"}]


def stream_texts(base: str, key: str) -> tuple[str, list[str]]:
    """A streamed completion through a served gateway: its request id and the text of each SSE chunk."""
    texts = []
    with httpx.stream("POST", f"{base}/v1/completions", headers=bearer(key), timeout=120,
                      json={**BODY, "max_tokens": 64, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        request_id = response.headers["x-govgate-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text = json.loads(line[6:])["choices"][0].get("text")
                if text:
                    texts.append(text)
    return request_id, texts


@pytest.mark.parametrize("ruled", [False, True], ids=["no-output-rule", "shipped-rules"])
def test_a_stream_without_an_output_rule_is_not_held_back(settings, worker, keyring, audit_store, tmp_path, ruled):
    """No rule, no hold-back: the first token goes out as it comes (under the shipped rules the first text
    waits until the text past it was judged: at least half the hold-back at once), the worker waits for no
    verdict, and records the allow its gateway would have sent."""
    folder = policy_copy(tmp_path, _roomy_limits) if ruled else without_output_rule(tmp_path)
    holdback = settings.output_holdback_chars
    with serving(settings.with_(policy_dir=folder, output_rules=True), tmp_path / "serve.log") as base, \
            CommandLog(settings.redis_url) as log:
        request_id, texts = stream_texts(base, keyring["analyst"])
    whole = "".join(texts)
    assert len(whole) > 2 * holdback  # long enough for the hold-back to show
    terminal = audit_store.terminal_for(request_id)
    assert terminal.kind == "completion" and terminal.payload["client_output"] == terminal.payload["output"] == whole
    if ruled:
        assert len(texts[0]) >= holdback // 2
        assert verdict_waits(log, request_id) > 0  # the worker reported and waited for the verdict
        return
    assert len(texts[0]) < holdback // 2 and len(texts) >= 2
    assert verdict_waits(log, request_id) == 0
    assert terminal.body["output_decision"] == {"allow": True, "reasons": [], "findings": [], "stopped": False,
                                                "policy_revision": terminal.policy_revision}
