"""``/schema/openapi.json`` tells the truth: checked cheaply, then by schemathesis on a served gateway.

The fuzzing test sends bounded, derandomized batches of generated requests
(positive and negative) to a real ``govgate serve`` with the tiny model, and
holds every answer to the document: no 5xx, a documented status, a documented
content type and headers, a body that matches the schema (the SSE stream
event by event). Then every request the gateway served has exactly one
request entry and one terminal entry in the audit store.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings as hypothesis_settings, strategies as st
from schemathesis.checks import not_a_server_error
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
from gateway.api.openapi import json_schema
from gateway.api.parsing import parse_body
from gateway.api.schemas import ChatCompletionRequest, CompletionRequest
from gateway.app import create_app
from gateway.settings import Settings
from workers.contract.registry import TINY_MODEL_NAME
from tests.conftest import ROOT, policy_copy, serving

COMPLETION_ROUTES = {urls.CHAT_COMPLETIONS: ChatCompletionRequest, urls.COMPLETIONS: CompletionRequest}
ERROR_STATUSES = {"400", "401", "403", "404", "413", "422", "429", "502", "503", "504"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
#: Per operation and generation mode; small enough for a busy 2-core machine, large enough to serve some.
MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The description as the app builds it (no Redis or worker needed: the lifespan does not run)."""
    app = create_app(Settings(var_dir=tmp_path_factory.mktemp("var")))
    return app.openapi_schema.to_schema()


def _bare(schema: Any) -> Any:
    """``schema`` without its descriptions (notes added for people, not constraints)."""
    if isinstance(schema, dict):
        return {key: _bare(value) for key, value in schema.items() if key != "description"}
    if isinstance(schema, list):
        return [_bare(item) for item in schema]
    return schema


def _readme_error_statuses() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    return set(re.findall(r"^\| ([45]\d\d) \| `", readme, flags=re.MULTILINE))


@pytest.mark.parametrize("path", sorted(COMPLETION_ROUTES))
def test_completion_routes_are_described(document: dict[str, Any], path: str) -> None:
    operation = document["paths"][path]["post"]
    body = operation["requestBody"]["content"]["application/json"]
    kind = COMPLETION_ROUTES[path]

    assert operation["requestBody"]["required"] is True
    assert _bare(body["schema"]) == _bare(json_schema(kind))  # the struct the body is validated against
    assert body["schema"]["additionalProperties"] is False and "only 1" in body["schema"]["properties"]["n"][
        "description"]
    assert {"name": urls.PURPOSE_HEADER, "in": "header"}.items() <= operation["parameters"][0].items()
    parse_body(json.dumps(body["example"]).encode(), kind)  # the documented example is a valid request
    assert operation["security"] == [{"bearer": []}]
    bearer = document["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert operation["operationId"] == ("createChatCompletion" if path == urls.CHAT_COMPLETIONS
                                        else "createCompletion")  # OpenAI's names, for generated clients

    responses = operation["responses"]
    assert set(responses) == {"200"} | ERROR_STATUSES
    assert _readme_error_statuses() <= set(responses)  # every status of README's error table
    success = responses["200"]
    assert success["content"]["application/json"]["schema"]["properties"]["object"]["enum"] == [
        "chat.completion" if kind is ChatCompletionRequest else "text_completion"]
    assert "data" in success["content"]["text/event-stream"]["schema"]["properties"]
    assert success["headers"][urls.REQUEST_ID_HEADER]["required"] is True
    for status in ERROR_STATUSES:
        error = responses[status]["content"]["application/json"]["schema"]
        assert error["required"] == ["error"]
        assert set(error["properties"]["error"]["required"]) == {"message", "type", "code", "param"}
    assert responses["429"]["headers"]["Retry-After"]["required"] is True
    assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True


def test_models_and_health_are_described(document: dict[str, Any]) -> None:
    models = document["paths"][urls.MODELS]["get"]
    assert models["security"] == [{"bearer": []}] and set(models["responses"]) == {"200", "401", "503"}
    assert models["responses"]["200"]["content"]["application/json"]["schema"]["title"] == "ModelList"
    model = document["paths"]["/v1/models/{model_id}"]["get"]
    assert model["security"] == [{"bearer": []}] and set(model["responses"]) == {"200", "401", "404", "503"}
    assert model["responses"]["200"]["content"]["application/json"]["schema"]["title"] == "Model"
    assert model["operationId"] == "retrieveModel"
    health = document["paths"][urls.HEALTH]["get"]
    assert "security" not in health and set(health["responses"]) == {"200", "503"}


# -- schemathesis on a served gateway ---------------------------------------


@pytest.fixture(scope="module")
def api_schema(served_api: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{served_api}/schema/openapi.json")


def _header(response: Any, name: str) -> str | None:
    """One header of a schemathesis response (its headers map lower-cased names to lists of values)."""
    values = {key.lower(): value for key, value in response.headers.items()}.get(name.lower())
    return values[0] if values else None


def _operations(schema: schemathesis.BaseSchema) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


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
    ("viewer", {}, 403, "policy_denied"),
    ("revoked", {}, 401, "invalid_api_key"),
    ("analyst", {"model": "no-such-model"}, 404, "model_not_found"),
    ("analyst", {"n": 2}, 400, "unsupported_parameter"),
    ("analyst", {"temperature": 9}, 422, "invalid_value"),
], ids=["denied", "revoked", "unknown-model", "unsupported", "out-of-range"])
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
    new = [entry for entry in audit_store.tail(5) if before is None or entry.seq > before.seq]
    if key == "revoked":
        assert new == []  # no principal, nothing to attribute
    else:
        assert [entry.kind for entry in new] == ["request" if status == 403 else "rejected"]


def test_a_limit_refusal_is_as_described(api_schema, settings: Settings, worker, keyring: dict[str, str],
                                         tmp_path: Path) -> None:
    """429 on a gateway whose policy allows no request a minute: the error body and a Retry-After header."""
    def no_requests(config: dict[str, Any]) -> None:
        config.setdefault("limits", {}).setdefault("principals", {})["alice"] = {"requests_per_minute": 0}

    own = settings.with_(policy_dir=policy_copy(tmp_path, no_requests))
    operation = api_schema[urls.COMPLETIONS]["POST"]
    example = operation.definition.raw["requestBody"]["content"]["application/json"]["example"]
    case = operation.Case(body=example, media_type="application/json")
    with serving(own, tmp_path / "serve.log") as base:
        response = case.call(base_url=base, headers={"Authorization": f"Bearer {keyring['analyst']}"}, timeout=120)
    case.validate_response(response, checks=CHECKS)  # Retry-After is documented as required on 429

    assert (response.status_code, response.json()["error"]["code"]) == (429, "rate_limited")
    assert int(_header(response, "retry-after")) >= 1


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

    # Negative mode needs something to break: only the completion routes take input.
    operations = [op for op in _operations(api_schema) if mode is GenerationMode.POSITIVE or op.body]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode), served_model=st.booleans())
        @hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                             phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
        def run(case, served_model: bool) -> None:
            if served_model and mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
                case.body["model"] = TINY_MODEL_NAME
            response = case.call(base_url=served_api, headers=headers, timeout=120)
            case.validate_response(response, checks=checks)
            statuses.setdefault(operation.label, set()).add(response.status_code)
            if response.status_code < 300 and _header(response, urls.REQUEST_ID_HEADER):
                served.append(_header(response, urls.REQUEST_ID_HEADER))

        run()

    assert all(statuses.get(op.label) for op in operations), statuses
    assert served or mode is GenerationMode.NEGATIVE  # negative bodies are refused (negative_data_rejection)
    _assert_audited(audit_store, served)
