"""A model a key may not see is refused exactly like a model that does not exist, on both policy engines.

GET /v1/models shows a key only what the policy's ``visible_models`` gives
it; completions for any other model used to answer 403 ``policy_denied``
naming the model and the rule, while an unknown name got 404: any key could
tell which models exist. Each hidden case here (a role that grants no model,
no role the policy knows, a role that lacks the model, a team's model list)
is compared with an unknown name sent by the same key: status, body (the
model's name aside), headers. The audit entry keeps the real decision and
the metrics count the real refusal; a model the key may see keeps its 403.
Real gateway app, real Redis, real regorus and a real OPA server, no worker
(nothing here is admitted).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from litestar.testing import AsyncTestClient

from gateway import urls
from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.components import open_database
from govgate.opa_server import OpaServer
from govgate.redis_server import RedisProcess
from tests.conftest import IDLE_MODEL, _roomy_limits, bearer, policy_copy
from tests.ops.metrics_text import samples, value
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "Hello"}]
UNKNOWN = "no-such-model-at-all"
#: Headers that differ between any two responses (ids, dates, the body's length with the model's name).
_VARYING = {"x-govgate-request-id", "x-request-id", "date", "content-length"}


def _config(config: dict) -> None:
    """The shipped policy, limits lifted, and the test models' tag ``tiny`` needing a declared purpose:
    a visible model can then be denied for something other than who may see it."""
    _roomy_limits(config)
    config["purposes"]["required_for_tags"] = ["tiny"]


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return policy_copy(tmp_path_factory.mktemp("hidden"), _config)


@pytest.fixture(scope="module")
def keys(settings) -> dict[str, str]:
    """Keys of the shipped roles, and an admin (every model by role) whose team lists two models."""
    store = KeyStore(open_database(settings))
    made = {
        "viewer": store.create("hidden-viewer", team="research", roles=["viewer"]).secret,
        "nobody": store.create("hidden-nobody", team=None, roles=[]).secret,
        "analyst": store.create("hidden-analyst", team="research", roles=["analyst"]).secret,
        "support_admin": store.create("hidden-support", team="support", roles=["admin"]).secret,
        "admin": store.create("hidden-admin", team="ops", roles=["admin"]).secret,
    }
    store.engine.dispose()
    return made


@pytest.fixture(scope="module", params=["embedded", "opa"])
async def client(request: pytest.FixtureRequest, settings, policy_folder: Path) -> AsyncIterator[AsyncTestClient]:
    """The app deciding on regorus, or on an OPA that loaded the same folder itself."""
    own = settings.with_(policy_dir=policy_folder)
    server = None
    if request.param == "opa":
        server = OpaServer(request.getfixturevalue("opa_binary"), request.getfixturevalue("opa_log_dir"),
                           policy_folder).start()
        own = own.with_(opa_url=server.url)
    try:
        async with AsyncTestClient(create_app(own), timeout=60) as test_client:
            yield test_client
    finally:
        if server is not None:
            server.stop()


def _seen(response, model: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """What a client receives, with the model's name replaced by ``M`` and the per-response headers left out."""
    body = response.json()
    error = body.get("error", {})
    if isinstance(error.get("message"), str):
        error["message"] = error["message"].replace(model, "M")
    headers = {name.lower(): value for name, value in response.headers.items() if name.lower() not in _VARYING}
    return response.status_code, body, headers


def _body(endpoint: str, model: str, stream: bool, **extra: Any) -> dict[str, Any]:
    if endpoint == urls.CHAT_COMPLETIONS:
        return {"model": model, "messages": HELLO, "stream": stream, **extra}
    return {"model": model, "prompt": "Hello", "stream": stream, **extra}


#: (key, model, the reasons the audit must keep): every way the shipped policy hides a model from a key.
#: Each request also lacks the purpose the models' tag calls for: that reason, which alone would be a 403,
#: must not show through either.
HIDDEN = [
    ("viewer", TINY_MODEL_NAME, ["model_not_allowed"]),  # a role that grants no model
    ("nobody", TINY_MODEL_NAME, ["unknown_role"]),  # no role the policy knows
    ("analyst", IDLE_MODEL, ["model_not_allowed"]),  # a role whose list lacks the model
    ("support_admin", IDLE_MODEL, ["team_model_not_allowed"]),  # every model by role, but not in the team's list
]


@pytest.mark.parametrize("endpoint", [urls.CHAT_COMPLETIONS, urls.COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("key,model,reasons", HIDDEN)
async def test_a_hidden_model_is_answered_as_an_unknown_one(client, keys, audit_store, endpoint, stream, key,
                                                            model, reasons):
    listed = (await client.get(urls.MODELS, headers=bearer(keys[key]))).json()["data"]
    assert model not in [m["id"] for m in listed]  # the premise: GET /v1/models hides it from this key
    hidden = await client.post(endpoint, headers=bearer(keys[key]), json=_body(endpoint, model, stream))
    unknown = await client.post(endpoint, headers=bearer(keys[key]), json=_body(endpoint, UNKNOWN, stream))
    assert unknown.status_code == 404, unknown.text
    assert _seen(hidden, model) == _seen(unknown, UNKNOWN), hidden.text
    assert hidden.json()["error"]["message"] == (f"The model '{model}' does not exist or you do not have access "
                                                 "to it. GET /v1/models lists the models you may use.")
    # the audit keeps the truth: the decision with its real reasons, and what the client was told
    entry = audit_store.entries_for(hidden.headers["x-govgate-request-id"])[0]
    assert entry.kind == "request" and entry.model == model
    assert entry.body["decision"]["allow"] is False
    codes = [r["code"] for r in entry.body["decision"]["reasons"]]
    assert set(reasons) <= set(codes) and "purpose_required" in codes  # a visible model's reason is hidden too
    assert entry.body["answered"]["status"] == 404 and entry.body["answered"]["code"] == "model_not_found"


async def test_the_team_rule_is_what_the_audit_names(client, keys, audit_store):
    hidden = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["support_admin"]),
                               json=_body(urls.CHAT_COMPLETIONS, IDLE_MODEL, False))
    assert hidden.status_code == 404 and "support" not in hidden.text and "team" not in hidden.text
    entry = audit_store.entries_for(hidden.headers["x-govgate-request-id"])[0]
    assert f"team 'support' of principal 'hidden-support' may not use model '{IDLE_MODEL}'" in \
        [r["message"] for r in entry.body["decision"]["reasons"]]


async def test_retrieving_a_hidden_model_is_the_same_404_as_completing_it(client, keys):
    retrieved = await client.get(f"{urls.MODELS}/{IDLE_MODEL}", headers=bearer(keys["support_admin"]))
    unknown = await client.get(f"{urls.MODELS}/{UNKNOWN}", headers=bearer(keys["support_admin"]))
    completed = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["support_admin"]),
                                  json=_body(urls.CHAT_COMPLETIONS, IDLE_MODEL, False))
    assert _seen(retrieved, IDLE_MODEL) == _seen(unknown, UNKNOWN) == _seen(completed, IDLE_MODEL)
    assert (await client.get(f"{urls.MODELS}/{IDLE_MODEL}", headers=bearer(keys["admin"]))).status_code == 200


async def test_a_body_the_hidden_model_cannot_take_is_still_the_unknown_404(client, keys, audit_store):
    """The checks made before the policy (a parameter the model's backend ignores) named the model and its
    backend in a 400 where an unknown name gets a 404."""
    extra = {"frequency_penalty": 0.5}
    hidden = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["support_admin"]),
                               json=_body(urls.CHAT_COMPLETIONS, IDLE_MODEL, False, **extra))
    unknown = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["support_admin"]),
                                json=_body(urls.CHAT_COMPLETIONS, UNKNOWN, False, **extra))
    assert _seen(hidden, IDLE_MODEL) == _seen(unknown, UNKNOWN), hidden.text
    entry = audit_store.entries_for(hidden.headers["x-govgate-request-id"])[0]
    assert entry.kind == "rejected" and entry.body["error"]["code"] == "unsupported_parameter"
    assert entry.body["answered"]["code"] == "model_not_found"
    visible = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["admin"]),
                                json=_body(urls.CHAT_COMPLETIONS, IDLE_MODEL, False, **extra))
    assert visible.status_code == 400 and visible.json()["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_model_the_key_may_see_keeps_its_403_with_reasons(client, keys, stream):
    no_purpose = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["analyst"]),
                                   json=_body(urls.CHAT_COMPLETIONS, TINY_MODEL_NAME, stream))
    assert no_purpose.status_code == 403, no_purpose.text
    assert [r["code"] for r in no_purpose.json()["error"]["reasons"]] == ["purpose_required"]
    card = await client.post(urls.CHAT_COMPLETIONS,
                             headers={**bearer(keys["analyst"]), urls.PURPOSE_HEADER: "research"},
                             json={**_body(urls.CHAT_COMPLETIONS, TINY_MODEL_NAME, stream),
                                   "messages": [{"role": "user", "content": "card 4111 1111 1111 1111"}]})
    assert card.status_code == 403, card.text
    assert card.json()["error"]["code"] == "policy_denied"


async def test_the_metrics_count_a_hidden_model_as_the_denial_it_was(client, keys):
    def moved(code: str) -> float:
        labels = {"endpoint": urls.CHAT_COMPLETIONS, "model": IDLE_MODEL, "status": "4xx", "code": code}
        return value(after, "govgate_requests_total", **labels) - value(before, "govgate_requests_total", **labels)

    before = samples((await client.get(urls.METRICS, headers=bearer(keys["admin"]))).text)
    hidden = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["support_admin"]),
                               json=_body(urls.CHAT_COMPLETIONS, IDLE_MODEL, False))
    assert hidden.status_code == 404
    after = samples((await client.get(urls.METRICS, headers=bearer(keys["admin"]))).text)
    assert moved("policy_denied") == 1 and moved("model_not_found") == 0


async def test_with_redis_down_a_hidden_model_is_still_the_unknown_404(settings, policy_folder, keys, audit_store,
                                                                      short_tmp):
    """Usage counters that cannot be read refuse 503 before the policy is asked, where an unknown name is
    refused before Redis is needed: a hidden model must not show through that 503 either."""
    own_redis = RedisProcess.start(short_tmp("gg-h-"), persist=False)
    try:
        own = settings.with_(redis_url=own_redis.url, policy_dir=policy_folder)
        async with AsyncTestClient(create_app(own), timeout=60) as client:
            own_redis.stop()
            hidden = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["support_admin"]),
                                       json=_body(urls.CHAT_COMPLETIONS, IDLE_MODEL, False))
            unknown = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["support_admin"]),
                                        json=_body(urls.CHAT_COMPLETIONS, UNKNOWN, False))
            visible = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["admin"]),
                                        json=_body(urls.CHAT_COMPLETIONS, IDLE_MODEL, False))
    finally:
        own_redis.stop()
    assert _seen(hidden, IDLE_MODEL) == _seen(unknown, UNKNOWN), hidden.text
    assert visible.status_code == 503 and visible.json()["error"]["code"] == "usage_unavailable"
    entry = audit_store.entries_for(hidden.headers["x-govgate-request-id"])[0]
    assert [r["code"] for r in entry.body["decision"]["reasons"]] == ["usage_unavailable"]
    assert entry.body["answered"]["code"] == "model_not_found"


async def test_with_the_audit_store_down_a_hidden_model_is_still_the_unknown_name(settings, policy_folder,
                                                                                  tmp_path):
    """With no audit entry to be had, an unknown name's refusal is a 503 ``audit_unavailable`` (nothing is
    answered unaudited; it was a 404 with its entry only logged as missing), and so is a hidden model's
    denial, as its refusal must be the unknown name's."""
    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'own.db'}", policy_dir=policy_folder)
    engine = open_database(own)
    store = KeyStore(engine)
    support_admin = store.create("sue", team="support", roles=["admin"]).secret
    admin = store.create("odo", team="ops", roles=["admin"]).secret
    engine.dispose()
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        with sqlite3.connect(own.effective_database_url.removeprefix("sqlite:///")) as raw:
            raw.execute("DROP TABLE audit_entries")
        hidden = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(support_admin),
                                   json=_body(urls.CHAT_COMPLETIONS, IDLE_MODEL, False))
        unknown = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(support_admin),
                                    json=_body(urls.CHAT_COMPLETIONS, UNKNOWN, False))
        visible = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(admin),
                                    json=_body(urls.CHAT_COMPLETIONS, IDLE_MODEL, False))
    assert _seen(hidden, IDLE_MODEL) == _seen(unknown, UNKNOWN), hidden.text
    for response in (hidden, unknown, visible):
        assert response.status_code == 503 and response.json()["error"]["code"] == "audit_unavailable", response.text


async def test_when_the_policy_cannot_say_a_refusal_naming_the_model_is_a_503(settings, policy_folder, keys,
                                                                             audit_store, start_opa):
    """A body the model cannot take names the model and its backend (400); with OPA gone, whether the key
    may see the model is unknown, so the client gets 503 ``policy_unavailable``, never that 400."""
    server = start_opa(policy_folder)
    own = settings.with_(policy_dir=policy_folder, opa_url=server.url)
    extra = {"frequency_penalty": 0.5}
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        server.stop()
        refused = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keys["support_admin"]),
                                    json=_body(urls.CHAT_COMPLETIONS, IDLE_MODEL, False, **extra))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "policy_unavailable" and IDLE_MODEL not in refused.text
    assert refused.headers["retry-after"] == "1"
    entry = audit_store.entries_for(refused.headers["x-govgate-request-id"])[0]
    assert entry.kind == "rejected" and entry.body["error"]["code"] == "unsupported_parameter"
    assert entry.body["answered"]["code"] == "policy_unavailable"


async def test_a_key_refused_again_is_asked_about_once_per_policy_revision(settings, tmp_path, monkeypatch):
    """Whether a key may see a model is asked of the policy on its first refusal only (a client hammering a
    hidden model, or a 429 storm, costs no second evaluation per refusal), and again once a reload changed the
    policy: here the reload lets the viewer role use the tiny model, which then refuses 403 for its purpose."""
    folder = policy_copy(tmp_path, _config)
    own = settings.with_(policy_dir=folder)
    store = KeyStore(open_database(own))
    key = store.create("hidden-again", team="research", roles=["viewer"]).secret
    store.engine.dispose()
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        policy = client.app.state.components.completions.admission.seen_models._policy
        asked: list[str] = []
        real = policy.visible_models_known

        async def counted(principal: dict, models: list) -> set[str] | None:  # the real engine, its calls counted
            asked.append(principal["id"])
            return await real(principal, models)

        monkeypatch.setattr(policy, "visible_models_known", counted)
        body = _body(urls.CHAT_COMPLETIONS, TINY_MODEL_NAME, False)
        answers = [await client.post(urls.CHAT_COMPLETIONS, headers=bearer(key), json=body) for _ in range(3)]
        assert [a.status_code for a in answers] == [404, 404, 404]
        assert asked == ["hidden-again"]  # asked once, not once per refusal
        data = folder / "data.json"
        document = json.loads(data.read_text())
        document["govgate_config"]["roles"]["viewer"]["models"] = [TINY_MODEL_NAME]
        data.write_text(json.dumps(document))
        assert (await policy.reload()).changed
        seen = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(key), json=body)
    assert asked == ["hidden-again", "hidden-again"]  # the new revision is asked anew
    assert seen.status_code == 403 and seen.json()["error"]["code"] == "policy_denied"  # visible now: its reason


@pytest.mark.parametrize("engine", ["embedded", "opa"])
async def test_a_visible_models_rule_that_errs_is_a_403_policy_error_not_an_empty_list(
        settings, tmp_path, keys, start_opa, engine):
    """``GET /v1/models`` answered 200 with no models when the policy's ``visible_models`` failed (a rule
    conflict, an error): "you may use nothing", and nothing for the operator but a log line (h10 F10)."""
    folder = policy_copy(tmp_path, _config)
    (folder / "errs.rego").write_text(
        "package govgate\n\nimport rego.v1\n\nvisible_models contains name if {\n"
        '\tinput.principal.id == "hidden-analyst"\n\tname = sprintf("%v", [10 / count([])])\n}\n', encoding="utf-8")
    own = settings.with_(policy_dir=folder)
    if engine == "opa":
        own = own.with_(opa_url=start_opa(folder).url)
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        listed = await client.get(urls.MODELS, headers=bearer(keys["analyst"]))
        one = await client.get(f"{urls.MODELS}/{TINY_MODEL_NAME}", headers=bearer(keys["analyst"]))
        other = await client.get(urls.MODELS, headers=bearer(keys["admin"]))  # its evaluation does not err
    assert listed.status_code == 403, listed.text
    error = listed.json()["error"]
    assert error["code"] == "policy_error" and "could not say which models" in error["message"]
    # One model asked for: answered as an unknown name would be (a 403 told registered names apart, probe p3).
    assert one.status_code == 404 and one.json()["error"]["code"] == "model_not_found", one.text
    assert other.status_code == 200 and other.json()["data"], other.text
