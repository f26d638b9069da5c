"""Usage rules enforced through the HTTP API: limits, budgets, content rules, purposes.

Each test runs the real gateway on a copy of the shipped policy whose data
document sets the rule under test, with the real Redis counters and a real
worker process, and checks the client's answer and the audit trail.
"""

from __future__ import annotations

import anyio
import httpx
import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.components import open_database
from tests.conftest import IDLE_MODEL, bearer, policy_copy, serving
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "Hello"}]


def new_key(settings, user: str, team: str | None, roles=("analyst",)) -> str:
    store = KeyStore(open_database(settings))
    try:
        return store.create(user, team=team, roles=list(roles)).secret
    finally:
        store.engine.dispose()


def limits_for(kind: str, name: str, **limits):
    def change(config: dict) -> None:
        config.setdefault("limits", {}).setdefault(kind + "s", {})[name] = limits
    return change


async def test_budget_holds_under_50_concurrent_requests(settings, worker, audit_store, tmp_path):
    budget = 300
    own = settings.with_(policy_dir=policy_copy(tmp_path, limits_for("principal", "bud", tokens_per_day=budget)))
    key = new_key(own, "bud", "budgeting")
    outcomes: list[httpx.Response] = []
    with serving(own, tmp_path / "serve.log") as base:
        async with httpx.AsyncClient(timeout=120) as client:  # 50 requests really in flight at once
            async def one() -> None:
                outcomes.append(await client.post(f"{base}/v1/completions", headers=bearer(key),
                                                  json={"model": TINY_MODEL_NAME, "prompt": "Count",
                                                        "max_tokens": 20}))

            async with anyio.create_task_group() as group:
                for _ in range(50):
                    group.start_soon(one)
    served = [r for r in outcomes if r.status_code == 200]
    refused = [r for r in outcomes if r.status_code == 429]
    assert len(served) + len(refused) == 50, str(sorted(r.status_code for r in outcomes))
    # budgets count prompt and completion tokens
    generated = sum(r.json()["usage"]["total_tokens"] for r in served)
    assert 0 < generated <= budget
    assert refused and all(r.json()["error"]["code"] == "budget_exceeded" for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    audited = sum(audit_store.terminal_for(r.headers["x-govgate-request-id"]).body["usage"]["total_tokens"]
                  for r in served)
    assert audited == generated <= budget


def test_rpm_limit_holds_across_two_gateway_processes(settings, worker, tmp_path):
    """Two `govgate serve` processes share Redis: exactly N requests succeed in the minute."""
    limit = 5
    own = settings.with_(policy_dir=policy_copy(tmp_path, limits_for("principal", "rita", requests_per_minute=limit)))
    key = new_key(own, "rita", "research")
    with serving(own, tmp_path / "serve-a.log") as first, serving(own, tmp_path / "serve-b.log") as second:
        async def burst() -> list[int]:
            statuses: list[int] = []
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(base: str) -> None:
                    response = await client.post(f"{base}/v1/completions", headers=bearer(key),
                                                 json={"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 1})
                    statuses.append(response.status_code)
                    if response.status_code == 429:
                        assert response.json()["error"]["code"] == "rate_limited"
                async with anyio.create_task_group() as group:
                    for i in range(14):
                        group.start_soon(one, (first, second)[i % 2])
            return statuses

        statuses = anyio.run(burst)
    assert sorted(statuses) == [200] * limit + [429] * (14 - limit)


async def test_team_limit_binds_a_member_with_a_higher_personal_limit(settings, worker, tmp_path):
    def change(config: dict) -> None:
        limits_for("principal", "tess", requests_per_minute=100)(config)
        limits_for("team", "tight", requests_per_minute=3)(config)

    own = settings.with_(policy_dir=policy_copy(tmp_path, change))
    key = new_key(own, "tess", "tight")
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        statuses = []
        for _ in range(4):
            response = await client.post("/v1/completions", headers=bearer(key),
                                         json={"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 1})
            statuses.append(response.status_code)
    assert statuses == [200, 200, 200, 429]
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert "team" in error["message"] and "tight" in error["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 60


async def test_pii_is_redacted_in_the_audit_log_and_cards_are_refused(client, keyring, audit_store):
    text = "Mail alice@example.com about it"
    response = await client.post("/v1/chat/completions", headers=bearer(keyring["analyst"]),
                                 json={"model": TINY_MODEL_NAME, "max_tokens": 2,
                                       "messages": [{"role": "user", "content": text}]})
    assert response.status_code == 200, response.text
    entry = audit_store.entries_for(response.headers["x-govgate-request-id"])[0]
    assert entry.body["prompt_logging"] == "redacted"
    assert entry.body["messages"][0]["content"] == "Mail [REDACTED:email] about it"
    assert "alice@example.com" not in str(entry.body)  # not in the decision's obligations either

    card = await client.post("/v1/chat/completions", headers=bearer(keyring["analyst"]),
                             json={"model": TINY_MODEL_NAME, "max_tokens": 2,
                                   "messages": [{"role": "user", "content": "Card 4111 1111 1111 1111 please"}]})
    assert card.status_code == 403
    assert [r["code"] for r in card.json()["error"]["reasons"]] == ["pii_detected"]
    assert "4111" not in card.text


async def test_blocked_pattern_is_refused_with_its_reason(client, keyring):
    response = await client.post("/v1/completions", headers=bearer(keyring["analyst"]),
                                 json={"model": TINY_MODEL_NAME, "max_tokens": 2,
                                       "prompt": "-----BEGIN RSA PRIVATE KEY-----\nMIIE"})
    assert response.status_code == 403
    assert [r["code"] for r in response.json()["error"]["reasons"]] == ["blocked_content"]


async def test_restricted_model_needs_an_allowed_purpose(settings, keyring, tmp_path):
    def change(config: dict) -> None:
        config.setdefault("models", {})[IDLE_MODEL] = {"purposes": ["evaluation"]}

    # The idle model carries the "tiny" tag; make "tiny" a restricted tag for this policy copy.
    def restrict(config: dict) -> None:
        change(config)
        config["purposes"]["required_for_tags"] = ["tiny"]

    own = settings.with_(policy_dir=policy_copy(tmp_path, restrict), request_timeout_s=0.5)
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        none = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                 json={"model": IDLE_MODEL, "messages": HELLO})
        wrong = await client.post("/v1/chat/completions", headers={**bearer(keyring["admin"]),
                                                                   "X-Govgate-Purpose": "marketing"},
                                  json={"model": IDLE_MODEL, "messages": HELLO})
        right = await client.post("/v1/chat/completions", headers={**bearer(keyring["admin"]),
                                                                   "X-Govgate-Purpose": "evaluation"},
                                  json={"model": IDLE_MODEL, "messages": HELLO})
        by_metadata = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                        json={"model": IDLE_MODEL, "messages": HELLO,
                                              "metadata": {"purpose": "evaluation"}})
    assert [r["code"] for r in none.json()["error"]["reasons"]] == ["purpose_required"]
    assert [r["code"] for r in wrong.json()["error"]["reasons"]] == ["purpose_not_allowed"]
    # Allowed by policy: the request is queued (nobody serves this model, so it times out).
    assert right.status_code == 504 and by_metadata.status_code == 504


async def test_policy_hot_reload_applies_new_rules_and_rejects_broken_ones(settings, keyring, audit_store, tmp_path):
    folder = policy_copy(tmp_path)
    own = settings.with_(policy_dir=folder, policy_reload_interval_s=0.1)
    request = {"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 1}
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        before = await client.post("/v1/completions", headers=bearer(keyring["analyst"]), json=request)
        old_revision = audit_store.entries_for(before.headers["x-govgate-request-id"])[0].policy_revision

        data = folder / "data.json"
        import json
        document = json.loads(data.read_text())
        document["govgate_config"]["roles"]["analyst"]["models"] = []
        data.write_text(json.dumps(document))
        with anyio.fail_after(15):
            while (await client.get("/healthz")).json()["policy_revision"] == old_revision:
                await anyio.sleep(0.1)
        after = await client.post("/v1/completions", headers=bearer(keyring["analyst"]), json=request)
        new_revision = (await client.get("/healthz")).json()["policy_revision"]

        (folder / "govgate.rego").write_text((folder / "govgate.rego").read_text() + "\nthis is not rego\n")
        await anyio.sleep(1.0)  # several reload intervals
        still = await client.post("/v1/completions", headers=bearer(keyring["analyst"]), json=request)
        kept_revision = (await client.get("/healthz")).json()["policy_revision"]
    assert before.status_code == 200
    assert after.status_code == 403
    assert [r["code"] for r in after.json()["error"]["reasons"]] == ["model_not_allowed"]
    denied_entry = audit_store.tail(5)
    assert any(e.policy_revision == new_revision for e in denied_entry) and new_revision != old_revision
    assert still.status_code == 403 and kept_revision == new_revision  # the broken policy was not taken


def test_sighup_reloads_the_policy_of_a_running_gateway(settings, worker, keyring, tmp_path):
    import json
    import signal
    import time

    folder = policy_copy(tmp_path)
    own = settings.with_(policy_dir=folder, policy_reload_interval_s=0)  # no polling: only the signal
    with serving(own, tmp_path / "serve.log") as base:
        first = httpx.get(f"{base}/healthz").json()["policy_revision"]
        data = folder / "data.json"
        document = json.loads(data.read_text())
        document["govgate_config"]["roles"]["analyst"]["max_tokens"] = 7
        data.write_text(json.dumps(document))
        time.sleep(0.5)
        unchanged = httpx.get(f"{base}/healthz").json()["policy_revision"]
        base.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/healthz").json()["policy_revision"] == first:
            assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
            time.sleep(0.1)
        response = httpx.post(f"{base}/v1/completions", headers=bearer(keyring["analyst"]), timeout=60,
                              json={"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 50})
    assert unchanged == first  # nothing reloads without the signal when polling is off
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 7


async def test_hash_prompt_logging_keeps_only_a_digest(settings, worker, keyring, audit_store, tmp_path):
    import hashlib

    from workers.contract.privacy import Digester
    from workers.contract.sealing import load_or_create_key

    def hashed(config: dict) -> None:
        config["roles"]["analyst"]["prompt_logging"] = "hash"

    own = settings.with_(policy_dir=policy_copy(tmp_path, hashed))
    secret = "the launch code is swordfish"
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        response = await client.post("/v1/chat/completions", headers=bearer(keyring["analyst"]),
                                     json={"model": TINY_MODEL_NAME, "max_tokens": 2,
                                           "messages": [{"role": "user", "content": secret}]})
    assert response.status_code == 200, response.text
    entry = audit_store.entries_for(response.headers["x-govgate-request-id"])[0]
    assert entry.body["prompt_logging"] == "hash"
    digest = Digester(load_or_create_key(own.effective_digest_key_file)).hexdigest(secret)
    assert entry.body["prompt_hmac_sha256"] == digest != hashlib.sha256(secret.encode()).hexdigest()
    assert "swordfish" not in str(entry.body)
