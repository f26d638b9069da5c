"""Content rules a careful user cannot walk around, through the HTTP API.

The real gateway on the shipped policy: the request's normalised view is
built by the gateway, judged by the embedded engine, and what the audit log
keeps of a prompt whose finding is spelt otherwise is checked.
"""

from __future__ import annotations

import pytest

from tests.conftest import bearer
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio


@pytest.fixture
def client(module_client):
    """The module's one app (``module_client``): its tests share nothing through the app's state."""
    return module_client


async def chat(client, key: str, *contents: str):
    return await client.post("/v1/chat/completions", headers=bearer(key),
                             json={"model": TINY_MODEL_NAME, "max_tokens": 2,
                                   "messages": [{"role": "user", "content": c} for c in contents]})


async def test_private_key_split_over_two_messages_is_refused(client, keyring):
    response = await chat(client, keyring["analyst"], "keep this: -----BEGIN RSA PRIV", "ATE KEY-----\nMIIEpAIB")
    assert response.status_code == 403, response.text
    assert [r["code"] for r in response.json()["error"]["reasons"]] == ["blocked_content"]


@pytest.mark.parametrize("contents", [
    ("here is mine: -----BEGIN RSA PRIVATE KEY----- MIIEpAIBAAKCAQEA7secretbody",),
    ("keep this: -----BEGIN RSA PRIV", "ATE KEY-----\nMIIEpAIBAAKCAQEA7secretbody"),
])
async def test_a_refused_private_key_is_kept_in_the_log_as_a_digest_only(client, keyring, audit_store, contents):
    """A blocked pattern guards a secret: the analyst's `full` level kept it in clear in the request entry's
    payload until 2026-12-05 (probe s54); the policy now makes such a request's level `hash`."""
    response = await chat(client, keyring["analyst"], *contents)
    assert response.status_code == 403, response.text
    [entry] = audit_store.entries_for(response.headers["x-govgate-request-id"])
    assert entry.kind == "request" and entry.body["decision"]["allow"] is False
    assert entry.body["prompt_logging"] == "hash" and entry.body["prompt_hmac_sha256"]
    assert entry.payload is None
    stored = repr(entry.body) + repr(entry.payload)
    assert "MIIEpAIB" not in stored and "secretbody" not in stored


@pytest.mark.parametrize("contents", [
    ("card 4111\u200b1111\u200b1111\u200b1111",),
    ("ssn \uff11\uff12\uff13\u2010\uff14\uff15\u2010\uff16\uff17\uff18\uff19",),
    ("-----begin pgp private key block-----",),
    ("-----BEGIN\tRSA \u0420RIV\u0410TE\u00a0KEY-----",),
])
async def test_evasive_spellings_are_refused(client, keyring, contents):
    response = await chat(client, keyring["analyst"], *contents)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["reasons"][0]["code"] in {"pii_detected", "blocked_content"}


async def test_finding_spelt_otherwise_withholds_the_prompt_from_the_log(client, keyring, audit_store):
    text = "write to \u0430nn@example.org please"  # a Cyrillic а
    response = await chat(client, keyring["analyst"], text)
    assert response.status_code == 200, response.text
    entry = audit_store.entries_for(response.headers["x-govgate-request-id"])[0]
    assert entry.body["prompt_logging"] == "redacted"
    assert entry.body["prompt_withheld"] is True
    assert "messages" not in entry.body and entry.payload is None
    assert "example.org" not in str(entry.body)
    assert not {"text", "normalized_text"} & entry.body["policy_input"]["request"].keys()
