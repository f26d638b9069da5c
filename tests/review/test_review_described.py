"""Every answer of the review API, as the app's own ``/schema/openapi.json`` describes it.

The documented schemas are closed (``additionalProperties: false``), so a
field the description does not know, a wrong type or an undocumented status
fails here, on SQLite and PostgreSQL, over entries of every shape the seed
makes (texts in payloads and in bodies, withheld or shown, every decision).
``tests/e2e/test_openapi.py`` then holds a served gateway to the same
document with generated requests.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema_rs
import pytest

from tests.review.conftest import all_entries, bearer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def document(rclient) -> dict[str, Any]:
    response = await rclient.get("/schema/openapi.json")
    assert response.status_code == 200
    return response.json()


def _operation(document: dict[str, Any], method: str, url: str) -> dict[str, Any]:
    """The documented operation whose path template matches ``url``."""
    for template, operations in document["paths"].items():
        pattern = "^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, url) and method.lower() in operations:
            return operations[method.lower()]
    raise AssertionError(f"{method} {url} is not in the description")


def described(document: dict[str, Any], response: Any) -> Any:
    """``response`` checked against its operation's description: status, headers, body. Returns the body."""
    request = response.request
    operation = _operation(document, request.method, request.url.path)
    answer = operation["responses"].get(str(response.status_code))
    assert answer is not None, (request.method, request.url.path, response.status_code, response.text)
    for name, header in (answer.get("headers") or {}).items():
        assert not header.get("required") or name.lower() in response.headers, name
    media_type = response.headers["content-type"].split(";")[0]
    content = answer["content"]
    assert media_type in content, (media_type, list(content))
    schema = content[media_type]["schema"]
    if media_type == "application/x-ndjson":
        body: Any = [json.loads(line) for line in response.text.split("\n") if line]  # not splitlines: U+2028
    elif media_type == "application/json":
        body = response.json()
    else:
        return response.text
    errors = [f"{error.instance_path}: {error.message}" for error in
              jsonschema_rs.Draft202012Validator(schema).iter_errors(body)]
    assert errors == [], (request.url.path, errors[:5])
    return body


async def test_searches_and_exports_are_as_described(rclient, rstore, rkeys, document):
    for key, params in [(rkeys.auditor, {"limit": "500", "order": "oldest"}),
                        (rkeys.reviewer, {"limit": "500", "include_text": "true"}),
                        (rkeys.reviewer, {"kind": "payload_read,request", "q": "needle"}),
                        (rkeys.alice, {"decision": "deny"})]:
        page = described(document, await rclient.get("/v1/audit/entries", headers=bearer(key), params=params))
        assert page["data"]
    lines = described(document, await rclient.get("/v1/audit/export", headers=bearer(rkeys.auditor),
                                                  params={"format": "jsonl"}))
    assert len(lines) == len(all_entries(rstore))
    assert {"body.messages", "payload"} <= {name for line in lines for name in line.get("withheld", [])}
    shown = described(document, await rclient.get("/v1/audit/export", headers=bearer(rkeys.reviewer),
                                                  params={"format": "jsonl", "include_text": "true"}))
    assert any(line["payload"] for line in shown)
    described(document, await rclient.get("/v1/audit/export", headers=bearer(rkeys.auditor),
                                           params={"format": "csv"}))


@pytest.mark.parametrize("group_by", [None, "principal", "day,team,model,principal", "model"])
async def test_usage_is_as_described(rclient, rkeys, document, group_by):
    for key in (rkeys.auditor, rkeys.bob):
        usage = described(document, await rclient.get("/v1/audit/usage", headers=bearer(key),
                                                      params={"group_by": group_by} if group_by else {}))
        assert usage["data"] and usage["denials"]


async def test_stories_and_actions_are_as_described(rclient, rstore, rkeys, document):
    request_id = next(e.request_id for e in all_entries(rstore) if e.kind == "completion" and e.principal == "bob")
    url = f"/v1/audit/requests/{request_id}"
    for body, action in [({"note": "look"}, "flag"), (None, "flag"), ({"text": "seen"}, "comment"),
                         ({"disposition": "ok", "note": "fine"}, "disposition")]:
        entry = described(document, await rclient.post(f"{url}/{action}", headers=bearer(rkeys.reviewer),
                                                       json=body))
        assert entry["request_id"] == request_id
    for key, reads in ((rkeys.reviewer, True), (rkeys.auditor, True), (rkeys.bob, False)):
        for params in ({}, {"include_text": "true"}):
            story = described(document, await rclient.get(url, headers=bearer(key), params=params))
            assert story["request_id"] == request_id and ("reads" in story) is reads


@pytest.mark.parametrize("method,url,key,body,status", [
    ("GET", "/v1/audit/entries", None, None, 401),
    ("GET", "/v1/audit/entries?since=yesterday", "reviewer", None, 400),
    ("GET", "/v1/audit/entries?colour=red", "reviewer", None, 400),
    ("GET", "/v1/audit/entries?principal=alice", "bob", None, 403),
    ("GET", "/v1/audit/usage?principal=alice", "bob", None, 403),
    ("GET", "/v1/audit/export?format=xml", "auditor", None, 400),
    ("GET", "/v1/audit/requests/no-such-request", "reviewer", None, 404),
    ("GET", "/v1/audit/requests/x?include_text=maybe", "reviewer", None, 400),
    ("POST", "/v1/audit/requests/no-such-request/flag", "reviewer", {}, 404),
    ("POST", "/v1/audit/requests/{id}/flag", "auditor", {}, 403),
    ("POST", "/v1/audit/requests/{id}/comment", "reviewer", {"text": ""}, 422),
    ("POST", "/v1/audit/requests/{id}/disposition", "reviewer", {"disposition": "ok", "x": 1}, 400),
    ("POST", "/v1/audit/requests/{id}/disposition", "reviewer", [], 400),
])
async def test_refusals_are_as_described(rclient, rstore, rkeys, document, method, url, key, body, status):
    request_id = next(e.request_id for e in all_entries(rstore) if e.kind == "request")
    headers = bearer(getattr(rkeys, key)) if key else {}
    response = await rclient.request(method, url.replace("{id}", request_id), headers=headers,
                                     **({"json": body} if body is not None else {}))
    assert response.status_code == status, response.text
    error = described(document, response)
    assert set(error["error"]) >= {"message", "type", "code", "param"}
