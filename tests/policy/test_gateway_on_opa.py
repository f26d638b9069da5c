"""The gateway deciding on a real OPA server (production mode) instead of the embedded engine."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.policy import EmbeddedPolicyEngine
from tests.conftest import ROOT, bearer
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio


async def test_requests_are_decided_by_opa_with_the_same_answers_and_revision(
        settings, worker, keyring, audit_store, opa_policy_server):
    on_opa = settings.with_(opa_url=opa_policy_server, policy_dir=ROOT / "policies")
    embedded = EmbeddedPolicyEngine.load(ROOT / "policies", 1.0)
    try:
        async with AsyncTestClient(create_app(on_opa), timeout=60) as client:
            health = (await client.get("/readyz")).json()
            allowed = await client.post("/v1/chat/completions", headers=bearer(keyring["analyst"]),
                                        json={"model": TINY_MODEL_NAME, "max_tokens": 500,
                                              "messages": [{"role": "user", "content": "Hello"}]})
            denied = await client.post("/v1/chat/completions", headers=bearer(keyring["viewer"]),
                                       json={"model": TINY_MODEL_NAME,
                                             "messages": [{"role": "user", "content": "Hello"}]})
            models = (await client.get("/v1/models", headers=bearer(keyring["analyst"]))).json()
    finally:
        await embedded.aclose()
    assert health["policy_revision"] == embedded.revision  # OPA proved it holds the same folder
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["usage"]["completion_tokens"] == 256  # clamped by the analyst cap, on OPA
    entry = audit_store.entries_for(allowed.headers["x-govgate-request-id"])[0]
    assert entry.policy_revision == embedded.revision
    assert denied.status_code == 404  # a model the viewer may not see: answered as an unknown one
    denied_entry = audit_store.entries_for(denied.headers["x-govgate-request-id"])[0]
    assert [r["code"] for r in denied_entry.body["decision"]["reasons"]] == ["model_not_allowed"]
    assert [m["id"] for m in models["data"]] == [TINY_MODEL_NAME]


async def test_gateway_refuses_to_start_on_an_opa_holding_another_policy(settings, start_opa, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "govgate.rego").write_text('package govgate\n\nimport rego.v1\n\ndecision := {"allow": true}\n')
    server = start_opa(other)
    with pytest.raises(BaseException) as failure:
        async with AsyncTestClient(create_app(settings.with_(opa_url=server.url, policy_dir=ROOT / "policies"))):
            pass
    assert "PolicyLoadError" in " ".join(messages(failure.value)) and "revision" in " ".join(messages(failure.value))


def messages(exc: BaseException) -> list[str]:
    """Type names and messages of an exception and of everything grouped inside it."""
    found = [f"{type(exc).__name__}: {exc}"]
    for inner in getattr(exc, "exceptions", ()):
        found.extend(messages(inner))
    return found


async def test_policy_change_reaches_opa_and_the_gateway_follows(settings, keyring, start_opa, tmp_path):
    """OPA reloads the folder itself (--watch); the gateway proves the new revision and decides on it."""
    import json

    import anyio

    from tests.conftest import policy_copy

    folder = policy_copy(tmp_path)
    server = start_opa(folder, watch=True)
    own = settings.with_(opa_url=server.url, policy_dir=folder, policy_reload_interval_s=0.2)
    request = {"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 1}
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        first = (await client.get("/readyz")).json()["policy_revision"]
        before = await client.post("/v1/completions", headers=bearer(keyring["viewer"]), json=request)
        data = folder / "data.json"
        document = json.loads(data.read_text())
        document["govgate_config"]["roles"]["viewer"]["models"] = [TINY_MODEL_NAME]
        data.write_text(json.dumps(document))
        with anyio.fail_after(20):
            while (await client.get("/readyz")).json()["policy_revision"] == first:
                await anyio.sleep(0.2)
        after = await client.post("/v1/completions", headers=bearer(keyring["viewer"]), json=request)
    assert before.status_code == 404  # a model the viewer may not see: answered as an unknown one
    assert after.status_code != 404, after.text  # OPA now allows the viewer (queued to the tiny model)
