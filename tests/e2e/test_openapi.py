"""``/schema/openapi.json`` tells the truth, checked by schemathesis on a served gateway.

The cheap checks of the document itself are in ``tests/gateway/test_openapi_document.py``.
The fuzzing test sends bounded, derandomized batches of generated requests
(positive and negative) to a real ``govgate serve`` with the tiny model, and
holds every answer to the document: no 5xx, a documented status, a documented
content type and headers, a body that matches the schema (the SSE stream
event by event). Then every request the gateway served has exactly one
request entry and one terminal entry in the audit store.

The review API (``/v1/audit``) is generated for twice: with the analyst key
of every other operation (which may read only its own entries and act on
nothing: a documented 403 or 404), and with a reviewer's key, where half the
generated request ids name a request that exists, so that every review
operation must also answer successfully (200 or 201) at least once and its
body match the description.

Key administration (``/admin/keys``) is generated for with an admin's key
too: half the positive cases name a key that exists and roles the policy
knows, so every operation must answer 2xx at least once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings as hypothesis_settings, strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from audit import TERMINAL_KINDS, AuditStore
from gateway import urls
from gateway.auth import KeyStore
from gateway.components import open_database
from gateway.requests.schemas import ChatCompletionRequest, CompletionRequest
from gateway.settings import Settings
from workers.contract.registry import TINY_MODEL_NAME
from tests.conftest import policy_copy, serving

COMPLETION_ROUTES = {urls.CHAT_COMPLETIONS: ChatCompletionRequest, urls.COMPLETIONS: CompletionRequest}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
#: Routes whose 503 is a designed answer here: readiness, with models in the suite's registry no worker serves.
DESIGNED_503 = {urls.READY}
#: Per operation and generation mode; small enough for a busy 2-core machine, large enough to serve some.
MAX_EXAMPLES = 25


#: The answers that refuse a negative case: schemathesis's own list and 431, the answer to a request line and
#: headers over 16 KiB, which a long generated query reaches before any parameter is read.
NEGATIVE_REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "431", "5xx"]


@pytest.fixture(scope="module")
def api_schema(served_api: str) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": NEGATIVE_REFUSALS}}})
    return schemathesis.openapi.from_url(f"{served_api}/schema/openapi.json", config=config)


@schemathesis.deserializer("application/x-ndjson")
def _ndjson(_ctx: Any, response: Any) -> list[Any]:
    """A JSONL export as the list of its lines' documents (its description's schema is that list).

    Lines end at "\n" only: a text may hold U+2028 or U+0085 unescaped, which ``str.splitlines`` splits at.
    """
    return [json.loads(line) for line in response.content.decode("utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def reviewer_key(settings: Settings) -> str:
    store = KeyStore(open_database(settings))
    try:
        return store.create("rita", team="compliance", roles=["reviewer"]).secret
    finally:
        store.engine.dispose()


@pytest.fixture(scope="module")
def known_request(served_api: str, keyring: dict[str, str]) -> str:
    """The id of a request on the chain: one the policy denied (the viewer may use no model, so it is
    answered as an unknown model)."""
    response = httpx.post(f"{served_api}{urls.CHAT_COMPLETIONS}", timeout=60,
                          headers={"Authorization": f"Bearer {keyring['viewer']}"},
                          json={"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404, response.text
    return response.headers[urls.REQUEST_ID_HEADER]


def _header(response: Any, name: str) -> str | None:
    """One header of a schemathesis response (its headers map lower-cased names to lists of values)."""
    values = {key.lower(): value for key, value in response.headers.items()}.get(name.lower())
    return values[0] if values else None


def _key_unless_negative(case: Any, key_headers: dict[str, str]) -> dict[str, str]:
    """The key's Authorization header for ``case``, unless its invalid part is its headers.

    A negative case may break only the Authorization header (an empty or
    malformed value); sending the key over it made the request valid, and
    the check then called the 200 a schema-violating request accepted
    (seen with 600 random examples, 2026-12-03). Such a case goes with the
    header as generated, which the gateway must refuse (401).
    """
    meta = getattr(case, "meta", None)
    header = meta.components.get(ParameterLocation.HEADER) if meta is not None else None
    return {} if header is not None and header.mode is GenerationMode.NEGATIVE else key_headers


def _operations(schema: schemathesis.BaseSchema) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def _is_review(operation: Any) -> bool:
    return operation.path.startswith(urls.AUDIT + "/")


def _wait_for_terminal(audit_store: AuditStore, request_id: str, timeout_s: float = 60) -> list[str]:
    """The kinds of ``request_id``'s entries once its terminal entry is there (the worker may still write it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        kinds = [entry.kind for entry in audit_store.entries_for(request_id)]
        if any(kind in TERMINAL_KINDS for kind in kinds) or time.monotonic() > deadline:
            return kinds
        time.sleep(0.2)


def _assert_audited(audit_store: AuditStore, served: list[str]) -> None:
    for request_id in served:
        kinds = _wait_for_terminal(audit_store, request_id)
        assert kinds.count("request") == 1, (request_id, kinds)
        assert sum(kind in TERMINAL_KINDS for kind in kinds) == 1, (request_id, kinds)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("path", sorted(COMPLETION_ROUTES))
def test_documented_examples_are_served_as_described(api_schema, served_api: str, keyring: dict[str, str],
                                                     audit_store: AuditStore, path: str, stream: bool) -> None:
    operation = api_schema[path]["POST"]
    example = operation.definition.raw["requestBody"]["content"]["application/json"]["example"]
    case = operation.Case(body={**example, "stream": stream}, media_type="application/json")

    response = case.call(base_url=served_api, headers={"Authorization": f"Bearer {keyring['analyst']}"},
                         timeout=120)
    case.validate_response(response, checks=CHECKS)

    assert response.status_code == 200
    assert _header(response, "content-type").startswith("text/event-stream" if stream else "application/json")
    _assert_audited(audit_store, [_header(response, urls.REQUEST_ID_HEADER)])


@pytest.mark.parametrize(("key", "change", "status", "code"), [
    ("viewer", {}, 404, "model_not_found"),
    ("analyst", {"messages": [{"role": "user", "content": "card 4111 1111 1111 1111"}]}, 403, "policy_denied"),
    ("revoked", {}, 401, "invalid_api_key"),
    ("analyst", {"model": "no-such-model"}, 404, "model_not_found"),
    ("analyst", {"n": 2}, 400, "unsupported_parameter"),
    ("analyst", {"temperature": 9}, 422, "invalid_value"),
    ("analyst", {"metadata": {f"k{i}": "v" for i in range(17)}}, 422, "invalid_value"),
    ("analyst", {"metadata": {"purpose": "p" * 65}}, 422, "invalid_value"),
], ids=["hidden-model", "denied", "revoked", "unknown-model", "unsupported", "out-of-range", "metadata-over-bounds",
        "purpose-too-long"])
def test_refusals_are_as_described(api_schema, served_api: str, keyring: dict[str, str], audit_store: AuditStore,
                                   key: str, change: dict[str, Any], status: int, code: str) -> None:
    """Refusals of a documented example: the documented status, error body and headers; and audited."""
    operation = api_schema[urls.CHAT_COMPLETIONS]["POST"]
    example = operation.definition.raw["requestBody"]["content"]["application/json"]["example"]
    case = operation.Case(body={**example, **change}, media_type="application/json")
    before = audit_store.head()

    response = case.call(base_url=served_api, headers={"Authorization": f"Bearer {keyring[key]}"}, timeout=120)
    case.validate_response(response, checks=CHECKS)

    assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    new = [entry for entry in audit_store.tail(5)
           if (before is None or entry.seq > before.seq) and entry.kind != "chain_format"]
    if key == "revoked":
        assert new == []  # no principal, nothing to attribute
    else:
        assert [entry.kind for entry in new] == ["request" if key == "viewer" or status == 403 else "rejected"]


def test_a_limit_refusal_is_as_described(api_schema, settings: Settings, worker, keyring: dict[str, str],
                                         tmp_path: Path) -> None:
    """429 on a gateway whose policy allows one request a minute: the error body and a Retry-After header; and
    on one that allows none (no wait helps): no Retry-After, but ``x-should-retry: false``."""
    def one_request(config: dict[str, Any]) -> None:
        config.setdefault("limits", {}).setdefault("principals", {})["alice"] = {"requests_per_minute": 1}

    def no_requests(config: dict[str, Any]) -> None:
        config.setdefault("limits", {}).setdefault("principals", {})["alice"] = {"requests_per_minute": 0}

    operation = api_schema[urls.COMPLETIONS]["POST"]
    example = operation.definition.raw["requestBody"]["content"]["application/json"]["example"]
    case = operation.Case(body=example, media_type="application/json")
    headers = {"Authorization": f"Bearer {keyring['analyst']}"}
    with serving(settings.with_(policy_dir=policy_copy(tmp_path / "one", one_request)), tmp_path / "one.log") as base:
        # the first may be served (unless this session's earlier requests as alice fill the minute)
        answers = [case.call(base_url=base, headers=headers, timeout=120) for _ in range(2)]
    response = answers[-1]
    case.validate_response(response, checks=CHECKS)
    assert (response.status_code, response.json()["error"]["code"]) == (429, "rate_limited")
    assert int(_header(response, "retry-after")) >= 1

    with serving(settings.with_(policy_dir=policy_copy(tmp_path / "none", no_requests)), tmp_path / "none.log") as base:
        response = case.call(base_url=base, headers=headers, timeout=120)
    case.validate_response(response, checks=CHECKS)  # Retry-After is documented as optional on 429
    assert (response.status_code, response.json()["error"]["code"]) == (429, "rate_limited")
    assert _header(response, "x-should-retry") == "false" and _header(response, "retry-after") is None


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_generated_requests_conform_to_the_description(api_schema, served_api: str, keyring: dict[str, str],
                                                       audit_store: AuditStore, mode: GenerationMode) -> None:
    """Generated requests to every operation: only documented answers, and every served one audited.

    Half the positive completion bodies name the served model (a generated
    name is almost never one), so generation reaches the worker too, streamed
    or not; negative bodies keep what was generated.
    """
    headers = {"Authorization": f"Bearer {keyring['analyst']}"}
    served: list[str] = []
    statuses: dict[str, set[int]] = {}
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    # Negative mode needs something to break: the completion routes' bodies (the review routes' input is
    # broken with a reviewer's key below: with this key they refuse everything with 403 first).
    operations = [op for op in _operations(api_schema)
                  if mode is GenerationMode.POSITIVE or (op.body and not _is_review(op))]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode), served_model=st.booleans())
        @hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                             phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
        def run(case, served_model: bool) -> None:
            if served_model and mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
                case.body["model"] = TINY_MODEL_NAME
            response = case.call(base_url=served_api, headers=_key_unless_negative(case, headers), timeout=120)
            designed = operation.path in DESIGNED_503 and response.status_code == 503
            case.validate_response(response, checks=[c for c in checks if not (designed and c is not_a_server_error)])
            statuses.setdefault(operation.label, set()).add(response.status_code)
            if response.status_code < 300 and operation.path in COMPLETION_ROUTES:
                served.append(_header(response, urls.REQUEST_ID_HEADER))

        run()

    assert all(statuses.get(op.label) for op in operations), statuses
    assert served or mode is GenerationMode.NEGATIVE  # negative bodies are refused (negative_data_rejection)
    _assert_audited(audit_store, served)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_review_requests_conform_to_the_description(api_schema, served_api: str, reviewer_key: str,
                                                    known_request: str, audit_store: AuditStore,
                                                    mode: GenerationMode) -> None:
    """Generated requests to the review operations with a reviewer's key: only documented answers.

    Half the positive cases name a request that exists, so the story and
    the review actions get past 404, and each operation must have answered
    2xx at least once (its success body checked against the description).
    Negative cases (a bad filter, a bad body) must all be refused.
    """
    headers = {"Authorization": f"Bearer {reviewer_key}"}
    statuses: dict[str, set[int]] = {}
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    before = len(_review_actions(audit_store, known_request))
    operations = [op for op in _operations(api_schema) if _is_review(op)]
    assert len(operations) == 7, [op.label for op in operations]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode), known=st.booleans())
        @hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                             phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
        def run(case, known: bool) -> None:
            if known and mode is GenerationMode.POSITIVE and case.path_parameters:
                case.path_parameters["request_id"] = known_request
            response = case.call(base_url=served_api, headers=_key_unless_negative(case, headers), timeout=120)
            case.validate_response(response, checks=checks)
            statuses.setdefault(operation.label, set()).add(response.status_code)

        run()

    assert all(statuses.get(op.label) for op in operations), statuses
    if mode is GenerationMode.POSITIVE:
        assert {label: codes for label, codes in statuses.items() if not any(c < 300 for c in codes)} == {}
        actions = _review_actions(audit_store, known_request)
        assert len(actions) > before and {e.principal for e in actions} == {"rita"}


def _is_admin(operation: Any) -> bool:
    return operation.path.startswith(urls.ADMIN_KEYS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_key_administration_conforms_to_the_description(api_schema, served_api: str, keyring: dict[str, str],
                                                        settings: Settings, mode: GenerationMode) -> None:
    """Generated requests to ``/admin/keys`` with an admin's key: only documented answers.

    Half the positive cases name a live key (a revocation its own, so the
    role change's key stays live) and a role the policy knows (``viewer``,
    which grants no model), so each operation must answer 2xx at least once.
    """
    store = KeyStore(open_database(settings))
    try:
        target = store.create("tina", team=None, roles=["viewer"], by="test").key.key_id
        doomed = store.create("dora", team=None, roles=["viewer"], by="test").key.key_id
    finally:
        store.engine.dispose()
    headers = {"Authorization": f"Bearer {keyring['admin']}"}
    statuses: dict[str, set[int]] = {}
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    operations = [op for op in _operations(api_schema) if _is_admin(op)]
    assert len(operations) == 5, [op.label for op in operations]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode), known=st.booleans())
        @hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                             phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
        def run(case, known: bool) -> None:
            if known and mode is GenerationMode.POSITIVE:
                if case.path_parameters:
                    case.path_parameters["key_id"] = doomed if case.path.endswith("/revoke") else target
                if isinstance(case.body, dict) and "roles" in case.body:
                    case.body["roles"] = ["viewer"]
                if case.query:
                    case.query.pop("cursor", None)
            response = case.call(base_url=served_api, headers=_key_unless_negative(case, headers), timeout=120)
            case.validate_response(response, checks=checks)
            statuses.setdefault(operation.label, set()).add(response.status_code)

        run()

    assert all(statuses.get(op.label) for op in operations), statuses
    if mode is GenerationMode.POSITIVE:
        assert {label: codes for label, codes in statuses.items() if not any(c < 300 for c in codes)} == {}


def _review_actions(audit_store: AuditStore, request_id: str) -> list[Any]:
    return [e for e in audit_store.entries_for(request_id) if e.kind in ("flagged", "commented", "dispositioned")]
