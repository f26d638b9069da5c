"""``/schema/openapi.json`` as the app builds it: every route, body, status and header described.

No server needed; ``tests/e2e/test_openapi.py`` then holds a served gateway's
answers to this document with schemathesis (and ``tests/review/test_review_described.py``
the review API's answers on both databases).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gateway import urls
from gateway.api.openapi import json_schema
from gateway.requests.parsing import parse_body
from gateway.requests.schemas import ChatCompletionRequest, CompletionRequest
from gateway.app import create_app
from gateway.review.actions import BODIES
from gateway.review.params import ENTRY_PARAMS, EXPORT_PARAMS, STORY_PARAMS, USAGE_PARAMS
from gateway.settings import Settings
from tests.conftest import ROOT

COMPLETION_ROUTES = {urls.CHAT_COMPLETIONS: ChatCompletionRequest, urls.COMPLETIONS: CompletionRequest}
ERROR_STATUSES = {"400", "401", "403", "404", "413", "415", "422", "429", "431", "501", "502", "503", "504"}


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


def _readme_section(title: str) -> str:
    """README from the heading ``title`` to the next heading of its level or above."""
    readme = (ROOT / "README.md").read_text()
    level = title.split(" ")[0]
    section = readme[readme.index(f"\n{title}\n"):]
    ends = [section.index(f"\n{'#' * depth} ", 1) for depth in range(1, len(level) + 1)
            if f"\n{'#' * depth} " in section[1:]]
    return section[:min(ends)] if ends else section


def _readme_error_statuses(title: str = "## The API") -> set[str]:
    """The statuses of the error tables in one README section."""
    return set(re.findall(r"^\| ([45]\d\d) \| `", _readme_section(title), flags=re.MULTILINE))


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
    # a 429 whose request alone exceeds a token limit has no Retry-After (no wait helps) but x-should-retry
    assert responses["429"]["headers"]["Retry-After"]["required"] is False
    assert responses["429"]["headers"]["x-should-retry"]["schema"]["enum"] == ["false"]
    assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True


def test_models_and_health_are_described(document: dict[str, Any]) -> None:
    models = document["paths"][urls.MODELS]["get"]
    assert models["security"] == [{"bearer": []}] and set(models["responses"]) == {"200", "401", "403", "431", "503"}
    assert models["responses"]["200"]["content"]["application/json"]["schema"]["title"] == "ModelList"
    model = document["paths"]["/v1/models/{model_id}"]["get"]
    assert model["security"] == [{"bearer": []}] and set(model["responses"]) == {"200", "401", "404", "431", "503"}
    assert model["responses"]["200"]["content"]["application/json"]["schema"]["title"] == "Model"
    assert model["operationId"] == "retrieveModel"
    health = document["paths"][urls.HEALTH]["get"]
    assert "security" not in health and set(health["responses"]) == {"200", "431"}
    ready = document["paths"][urls.READY]["get"]
    # No key needed; a credential given must be the metrics token or an admin key (the per-model view).
    assert "security" not in ready and set(ready["responses"]) == {"200", "401", "403", "431", "503"}
    assert ready["responses"]["503"]["content"]["application/json"]["schema"]["title"] == "Readiness"
    assert "admin_forbidden" in ready["responses"]["403"]["description"]
    metrics = document["paths"][urls.METRICS]["get"]
    assert "security" not in metrics and set(metrics["responses"]) == {"200", "401", "403", "431"}


def test_every_operation_describes_the_431_of_an_overlong_head(document: dict[str, Any]) -> None:
    """The 16 KiB bound on a request's head is met before any route (gateway/http_head.py), so every
    operation can answer 431 (tests/ops/test_server_parts.py serves one); a client generated from the
    description must know it (found by schemathesis with a long review query, 2026-12-03)."""
    operations = {(method, path): operation for path, item in document["paths"].items()
                  for method, operation in item.items() if method in {"get", "post", "put", "delete", "patch"}}
    assert len(operations) >= 19, sorted(operations)
    for place, operation in operations.items():
        answer = operation["responses"].get("431")
        assert answer is not None, place
        assert "request_header_fields_too_large" in answer["description"], place
        assert answer["content"]["application/json"]["schema"]["required"] == ["error"], place


#: The review routes: (method, path) -> (operation id, the query parameters the route reads, statuses).
REVIEW_ROUTES = {
    ("get", "/v1/audit/entries"): ("listAuditEntries", ENTRY_PARAMS, {"200", "400", "401", "403", "431", "503"}),
    ("get", "/v1/audit/export"): ("exportAuditEntries", EXPORT_PARAMS, {"200", "400", "401", "403", "431", "503"}),
    ("get", "/v1/audit/usage"): ("getAuditUsage", USAGE_PARAMS, {"200", "400", "401", "403", "431", "503"}),
    ("get", "/v1/audit/requests/{request_id}"): ("retrieveAuditRequest", STORY_PARAMS,
                                                 {"200", "400", "401", "404", "431", "503"}),
    **{("post", f"/v1/audit/requests/{{request_id}}/{action}"): (
        f"{verb}AuditRequest", frozenset(), {"201", "400", "401", "403", "404", "413", "415", "422", "431", "501", "503"})
       for action, verb in (("flag", "flag"), ("comment", "comment"), ("disposition", "dispose"))},
}


@pytest.mark.parametrize(("method", "path"), sorted(REVIEW_ROUTES))
def test_review_routes_are_described(document: dict[str, Any], method: str, path: str) -> None:
    operation_id, params, statuses = REVIEW_ROUTES[(method, path)]
    operation = document["paths"][path][method]
    assert operation["operationId"] == operation_id and operation["tags"] == ["audit"]
    assert operation["security"] == [{"bearer": []}]
    parameters = {(p["name"], p["in"]): p for p in operation.get("parameters", [])}
    # Exactly the query parameters the route reads (gateway/review/params.py refuses any other).
    assert {name for name, place in parameters if place == "query"} == params
    if "{request_id}" in path:
        assert parameters[("request_id", "path")]["required"] is True
        assert parameters[("request_id", "path")]["schema"]["maxLength"] == 255

    responses = operation["responses"]
    assert set(responses) == statuses
    for status in statuses - {"200", "201"}:
        error = responses[status]["content"]["application/json"]["schema"]
        assert error["required"] == ["error"]
        assert set(error["properties"]["error"]["required"]) == {"message", "type", "code", "param"}
    assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
    success = responses["201" if method == "post" else "200"]
    if path != "/v1/audit/usage":  # usage shows no text: no read to name
        # Reads name their payload_read entry only when texts were shown or searched; actions always.
        assert success["headers"][urls.REQUEST_ID_HEADER]["required"] is (method == "post")
    if method == "post":  # the body is the struct the route reads it into
        action = path.rsplit("/", 1)[1]
        body = operation["requestBody"]
        assert _bare(body["content"]["application/json"]["schema"]) == _bare(json_schema(BODIES[action]))
        assert body["required"] is (action != "flag")  # a flag needs no body
        assert success["content"]["application/json"]["schema"]["title"] == "AuditEntryDocument"


def test_review_documents_are_closed_and_queries_strict(document: dict[str, Any]) -> None:
    entries = document["paths"]["/v1/audit/entries"]["get"]
    page = entries["responses"]["200"]["content"]["application/json"]["schema"]
    assert page["additionalProperties"] is False
    entry = page["properties"]["data"]["items"]
    assert entry["additionalProperties"] is False and set(entry["required"]) >= {"seq", "hash", "prev_hash", "body"}
    query = {p["name"]: p["schema"] for p in entries["parameters"] if p["in"] == "query"}
    assert query["limit"] == {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}
    assert query["decision"]["enum"] == ["allow", "deny", "unavailable"]
    assert (query["q"]["minLength"], query["q"]["maxLength"]) == (1, 1000)
    assert re.fullmatch(query["kind"]["items"]["pattern"], "request,completion")
    assert not re.fullmatch(query["kind"]["items"]["pattern"], "request,")
    export = document["paths"]["/v1/audit/export"]["get"]["responses"]["200"]
    assert set(export["content"]) == {"application/x-ndjson", "text/csv"}
    assert export["headers"]["Content-Disposition"]["required"] is True
    usage = document["paths"]["/v1/audit/usage"]["get"]
    group_by = next(p["schema"]["pattern"] for p in usage["parameters"] if p["name"] == "group_by")
    assert re.fullmatch(group_by, "day,team,model,principal") and not re.fullmatch(group_by, "day,")
    # Nothing under /v1/audit updates or deletes: only GET and POST are described.
    assert {method for path, item in document["paths"].items() if path.startswith("/v1/audit")
            for method in item} == {"get", "post"}
    # Every status of README's review error table is described for some review route.
    described = {status for (method, path) in REVIEW_ROUTES
                 for status in document["paths"][path][method]["responses"]}
    assert _readme_error_statuses("### Review") == {"400", "403", "404", "413", "415", "422", "501", "503"}
    assert _readme_error_statuses("### Review") <= described
