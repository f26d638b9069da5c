"""``/admin/keys`` in ``/schema/openapi.json``: every route, body, parameter and error described.

No server needed (``tests/e2e/test_openapi.py`` holds a served gateway's
answers to this description with schemathesis, with an admin's key).
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.api import admin_keys_shapes as shapes
from gateway.api.admin_keys_openapi import LIST_PARAMS
from gateway.api.openapi import json_schema
from gateway.app import create_app
from gateway.settings import Settings
from tests.gateway.test_openapi_document import _bare, _readme_error_statuses

ROUTES = {
    ("post", "/admin/keys"): ("createKey", {"201", "400", "401", "403", "413", "415", "422", "431", "501", "503"},
                              shapes.CreateKey),
    ("get", "/admin/keys"): ("listKeys", {"200", "400", "401", "403", "431", "503"}, None),
    ("get", "/admin/keys/{key_id}"): ("retrieveKey", {"200", "401", "403", "404", "431", "503"}, None),
    ("post", "/admin/keys/{key_id}/revoke"): ("revokeKey", {"200", "401", "403", "404", "409", "431", "503"}, None),
    ("put", "/admin/keys/{key_id}/roles"): ("setKeyRoles", {"200", "400", "401", "403", "404", "409", "413", "415",
                                                            "422", "431", "501", "503"}, shapes.SetRoles),
}
SUCCESS = {"createKey": "CreatedKey", "listKeys": "KeyList", "retrieveKey": "KeyDocument", "revokeKey": "ChangedKey",
           "setKeyRoles": "ChangedKey"}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return create_app(Settings(var_dir=tmp_path_factory.mktemp("var"))).openapi_schema.to_schema()


@pytest.mark.parametrize(("method", "path"), sorted(ROUTES))
def test_admin_routes_are_described(document: dict[str, Any], method: str, path: str) -> None:
    operation_id, statuses, body = ROUTES[(method, path)]
    operation = document["paths"][path][method]
    assert operation["operationId"] == operation_id and operation["tags"] == ["admin"]
    assert operation["security"] == [{"bearer": []}]
    parameters = {(p["name"], p["in"]): p for p in operation.get("parameters", [])}
    assert {name for name, place in parameters if place == "query"} == (set(LIST_PARAMS) if operation_id ==
                                                                         "listKeys" else set())
    if "{key_id}" in path:
        assert parameters[("key_id", "path")]["required"] is True
    responses = operation["responses"]
    assert set(responses) == statuses
    for status in statuses - {"200", "201"}:
        error = responses[status]["content"]["application/json"]["schema"]
        assert error["required"] == ["error"]
        assert set(error["properties"]["error"]["required"]) == {"message", "type", "code", "param"}
    assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
    success = responses["201" if operation_id == "createKey" else "200"]["content"]["application/json"]["schema"]
    assert success["title"] == SUCCESS[operation_id] and success["additionalProperties"] is False
    if body is None:
        assert "requestBody" not in operation
    else:
        request = operation["requestBody"]
        assert request["required"] is True
        assert _bare(request["content"]["application/json"]["schema"]) == _bare(json_schema(body))


def test_the_secret_is_described_only_where_it_is_shown(document: dict[str, Any]) -> None:
    created = document["paths"]["/admin/keys"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert "key" in created["required"]
    headers = document["paths"]["/admin/keys"]["post"]["responses"]["201"]["headers"]
    assert headers["Cache-Control"]["required"] is True
    for path, method in (("/admin/keys/{key_id}", "get"), ("/admin/keys/{key_id}/revoke", "post")):
        schema = document["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert "key" not in schema["properties"]
    listed = document["paths"]["/admin/keys"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert "key" not in listed["properties"]["data"]["items"]["properties"]


def test_readmes_key_administration_errors_are_described(document: dict[str, Any]) -> None:
    described = {status for (method, path) in ROUTES for status in document["paths"][path][method]["responses"]}
    statuses = _readme_error_statuses("### Key administration")
    assert statuses >= {"400", "403", "404", "409", "422", "503"} and statuses <= described
