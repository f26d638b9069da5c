"""Usage rules enforced through the HTTP API: a team's limit, content rules, purposes.

Each test runs the real gateway in-process, on the suite's policy or on a copy
of the shipped policy whose data document sets the rule under test, with the
real Redis counters and a real worker process, and checks the client's answer
and the audit trail. Limits under concurrent load, on served gateways, are in
``tests/e2e/test_usage_limits_under_load.py``.
"""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from tests.conftest import IDLE_MODEL, bearer, policy_copy
from tests.keys_and_limits import limits_for, new_key
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "Hello"}]


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
    assert entry.payload["messages"][0]["content"] == "Mail [REDACTED:email] about it"
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
