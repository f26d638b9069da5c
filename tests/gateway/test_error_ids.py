"""Every error response names its request (``X-Govgate-Request-Id``); retry hints are whole seconds;
``GET /v1/models/{id}`` answers in OpenAI's shape and hides what the key may not use.

Errors the gateway audited carry the id of their audit entries; errors refused
before anything was recorded carry a fresh id matching no entry.
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
ID_HEADER = "x-govgate-request-id"


@pytest.fixture
def client(module_client):
    """The module's one app (``module_client``): its tests share nothing through the app's state."""
    return module_client


@pytest.mark.parametrize("role,body,status,kinds", [
    ("analyst", b"{not json", 400, ["rejected"]),
    ("analyst", {"model": TINY_MODEL_NAME, "messages": HELLO, "max_tokens": 2**53}, 422, ["rejected"]),
    ("analyst", {"model": "no-such-model", "messages": HELLO}, 404, ["rejected"]),
    ("viewer", {"model": TINY_MODEL_NAME, "messages": HELLO}, 404, ["request"]),  # denied by policy, a model it
    # may not see: answered as unknown
    ("admin", {"model": TINY_MODEL_NAME, "messages": HELLO, "max_tokens": 4090}, 400, ["request"]),  # too long
], ids=["invalid-json", "out-of-range", "unknown-model", "policy-denied", "context-length"])
async def test_an_audited_error_names_its_audit_entries(client, keyring, audit_store, role, body, status, kinds):
    content = body if isinstance(body, bytes) else None
    response = await client.post("/v1/chat/completions", content=content, json=None if content else body,
                                 headers=bearer(keyring[role]))
    assert response.status_code == status, response.text
    request_id = response.headers[ID_HEADER]
    assert [e.kind for e in audit_store.entries_for(request_id)] == kinds
    assert audit_store.tail(1)[0].request_id == request_id


async def test_an_error_after_admission_names_the_request_and_its_terminal_entry(settings, keyring, audit_store):
    """No worker serves IDLE_MODEL: the wait runs out (504) after the request was recorded."""
    own = settings.with_(request_timeout_s=1.0)
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        response = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                     json={"model": IDLE_MODEL, "messages": HELLO, "max_tokens": 2})
    assert response.status_code == 504, response.text
    kinds = [e.kind for e in audit_store.entries_for(response.headers[ID_HEADER])]
    assert kinds == ["request", "timed_out"]


@pytest.mark.parametrize("method,path,headers,status", [
    ("POST", "/v1/chat/completions", {}, 401),
    ("GET", "/v1/models", {"Authorization": "Bearer gk_nope"}, 401),
    ("POST", "/v1/nowhere", None, 404),
    ("GET", "/v1/chat/completions", None, 405),
])
async def test_an_error_before_any_record_gets_a_fresh_id(client, keyring, audit_store, method, path, headers,
                                                          status):
    headers = bearer(keyring["admin"]) if headers is None else headers
    before = audit_store.head()
    first = await client.request(method, path, headers=headers)
    second = await client.request(method, path, headers=headers)
    assert first.status_code == second.status_code == status
    ids = {first.headers[ID_HEADER], second.headers[ID_HEADER]}
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)
    assert audit_store.head() == before
    assert all(audit_store.entries_for(i) == [] for i in ids)


async def test_retry_hints_are_whole_seconds(settings, worker, tmp_path):
    """The policy's Rego computes ``retry_after_s`` with ceil(), which engines answer as a float (17.0)."""
    own = settings.with_(policy_dir=policy_copy(tmp_path, limits_for("principal", "wanda", requests_per_minute=1)))
    key = new_key(own, "wanda", None)
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        request = {"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 1}
        assert (await client.post("/v1/completions", headers=bearer(key), json=request)).status_code == 200
        response = await client.post("/v1/completions", headers=bearer(key), json=request)
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"].isdigit()
    reasons = response.json()["error"]["reasons"]
    assert reasons and all(type(r["retry_after_s"]) is int and r["retry_after_s"] >= 1 for r in reasons)
    assert '"retry_after_s":%d' % reasons[0]["retry_after_s"] in response.text.replace(" ", "")


async def test_retrieve_a_model(client, keyring):
    response = await client.get(f"/v1/models/{TINY_MODEL_NAME}", headers=bearer(keyring["analyst"]))
    assert response.status_code == 200, response.text
    model = response.json()
    assert {k: model[k] for k in ("id", "object", "owned_by")} == {"id": TINY_MODEL_NAME, "object": "model",
                                                                      "owned_by": "govgate"}
    listed = (await client.get("/v1/models", headers=bearer(keyring["analyst"]))).json()["data"]
    assert model == next(m for m in listed if m["id"] == TINY_MODEL_NAME)


@pytest.mark.parametrize("role,model", [
    ("analyst", "no-such-model"),  # does not exist
    ("analyst", IDLE_MODEL),  # exists, but the policy does not let analysts use it
    ("viewer", TINY_MODEL_NAME),  # viewers may use no model
], ids=["unknown", "not-allowed", "no-models"])
async def test_retrieving_a_model_the_key_may_not_use_is_404(client, keyring, role, model):
    response = await client.get(f"/v1/models/{model}", headers=bearer(keyring[role]))
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert model in error["message"]
    assert response.headers[ID_HEADER]
    allowed = await client.get(f"/v1/models/{model}", headers=bearer(keyring["admin"]))
    assert allowed.status_code == (404 if model == "no-such-model" else 200)


async def test_retrieving_a_model_needs_a_key(client):
    assert (await client.get(f"/v1/models/{TINY_MODEL_NAME}")).status_code == 401
