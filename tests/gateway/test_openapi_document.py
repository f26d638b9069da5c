"""``/schema/openapi.json`` as the app builds it: every route, body, status and header described.

No server needed; ``tests/e2e/test_openapi.py`` then holds a served gateway's
answers to this document with schemathesis.
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
from gateway.settings import Settings
from tests.conftest import ROOT

COMPLETION_ROUTES = {urls.CHAT_COMPLETIONS: ChatCompletionRequest, urls.COMPLETIONS: CompletionRequest}
ERROR_STATUSES = {"400", "401", "403", "404", "413", "422", "429", "502", "503", "504"}


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
