"""The OpenAPI description of key administration (``/admin/keys``): parameters, bodies, answers and errors.

The routes read their bodies and query themselves, strictly (as the review
routes do, ``gateway/api/review_openapi.py``), so Litestar sees neither;
the operation classes here declare them from the structs of
:mod:`gateway.api.admin_keys_shapes` and the limits of
:mod:`gateway.keys_admin.service`, with every answer a route gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, Parameter, RequestBody

from gateway.api import admin_keys_shapes as shapes
from gateway.api.openapi import (JSON, UNAUTHORIZED, UNSUPPORTED_CODING, UNSUPPORTED_TRANSFER_CODING, JsonSchema,
                                 error_responses, header, json_schema)
from gateway.keys_admin.service import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

#: The query parameters ``GET /admin/keys`` reads (any other is refused).
LIST_PARAMS = ("limit", "cursor", "include_revoked")

_KEY_ID = Parameter(name="key_id", param_in="path", required=True,
                    schema=JsonSchema(document={"type": "string", "minLength": 1}),
                    description="A key's id: the 12 hex digits after `gk_` (never the secret itself).")
_QUERY = {
    "limit": Parameter(name="limit", param_in="query", required=False, description="Keys per page.",
                       schema=JsonSchema(document={"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE,
                                                   "default": DEFAULT_PAGE_SIZE})),
    "cursor": Parameter(name="cursor", param_in="query", required=False,
                        description="The `next_cursor` of the page before (keyset pages: no key that existed "
                                    "when paging began is repeated or skipped).",
                        schema=JsonSchema(document={"type": "string", "pattern": "^[0-9a-f]{12}$"})),
    "include_revoked": Parameter(name="include_revoked", param_in="query", required=False,
                                 description="List revoked keys too.",
                                 schema=JsonSchema(document={"type": "boolean", "default": False})),
}

_FORBIDDEN = ("`admin_forbidden`: only keys with the `admin` role administer keys.", {})
_UNAVAILABLE = ("`keys_unavailable`: the key store (database) or the policy's roles cannot be read or written; a "
                "change that could not be written was not made. `auth_unavailable`: API keys cannot be checked.",
                {})
_NOT_FOUND = ("`key_not_found`: no key has this id (a secret passed as the id is named as such, never echoed).",
              {})
_BAD_BODY = ("`invalid_json` (not a JSON object) or `unsupported_parameter` (an unknown field).", {})
_TOO_LARGE = ("`body_too_large`: the body is over GOVGATE_MAX_BODY_BYTES.", {})
_BAD_VALUE = ("`invalid_value` (a missing field, a wrong type, a name that is not 1-128 letters, digits or "
              "`. _ @ -`, no roles or too many, a note over 256 characters or with a NUL; `param` names it) or "
              "`unknown_role` (a role the policy does not know; the message lists those it does).", {})


def _json(kind: type) -> dict[str, OpenAPIMediaType]:
    return {JSON: OpenAPIMediaType(schema=JsonSchema(document=json_schema(kind)))}


_NO_STORE = {"Cache-Control": header("`no-store`: the answer holds a secret no cache may keep.",
                                     {"type": "string", "const": "no-store"})}
_PRIVATE = {"Cache-Control": header("`no-store`: the answer names users, teams, roles and notes, which no cache "
                                    "should keep.", {"type": "string", "const": "no-store"})}


def _operation(*, success: tuple[str, str, type], errors: dict[int, tuple[str, dict]], body: type | None = None,
               body_note: str = "", query: tuple[str, ...] = (), headers: dict | None = None) -> type[Operation]:
    """An ``Operation`` class: the path's key id, the query, the body and every answer."""

    @dataclass
    class AdminKeysOperation(Operation):
        def __post_init__(self) -> None:
            path = [_KEY_ID if getattr(p, "name", None) == "key_id" else p for p in self.parameters or []]
            self.parameters = [*path, *(_QUERY[name] for name in query)] or None
            if body is not None:
                self.request_body = RequestBody(required=True, content=_json(body), description=(
                    f"{body_note} Read strictly: an unknown field is refused with 400 `unsupported_parameter`."))
            status, description, kind = success
            self.responses = {status: OpenAPIResponse(description=description, content=_json(kind), headers=headers),
                              **error_responses({401: UNAUTHORIZED, 403: _FORBIDDEN, 503: _UNAVAILABLE, **errors})}

    return AdminKeysOperation


CREATE_OPERATION = _operation(
    success=("201", "The new key, with its secret (`key`) shown this once.", shapes.CreatedKey),
    errors={400: _BAD_BODY, 413: _TOO_LARGE, 415: UNSUPPORTED_CODING, 422: _BAD_VALUE,
            501: UNSUPPORTED_TRANSFER_CODING}, body=shapes.CreateKey,
    headers=_NO_STORE,
    body_note="Who the key is for and what it may do.")
LIST_OPERATION = _operation(
    success=("200", "A page of keys, oldest first.", shapes.KeyList),
    errors={400: ("`invalid_parameter` (a `limit` out of range, a `cursor` that is not a previous page's, "
                  "`include_revoked` not `true`/`false`/`1`/`0`, a repeated parameter) or `unsupported_parameter` (a "
                  "parameter this route does not take).", {})},
    query=LIST_PARAMS, headers=_PRIVATE)
GET_OPERATION = _operation(success=("200", "The key.", shapes.KeyDocument), errors={404: _NOT_FOUND},
                           headers=_PRIVATE)
REVOKE_OPERATION = _operation(
    success=("200", "The key, revoked: refused at once by every gateway. Revoking a revoked key changes nothing "
                    "(`changed: false`).", shapes.ChangedKey),
    errors={404: _NOT_FOUND,
            409: ("`last_admin`: the last live key with the `admin` role cannot be revoked (nobody could "
                  "administer keys after it); make another admin key first.", {})},
    headers=_PRIVATE)
ROLES_OPERATION = _operation(
    success=("200", "The key with its new roles, in force at once on every gateway.", shapes.ChangedKey),
    errors={400: _BAD_BODY, 404: _NOT_FOUND, 413: _TOO_LARGE, 415: UNSUPPORTED_CODING, 422: _BAD_VALUE,
            501: UNSUPPORTED_TRANSFER_CODING,
            409: ("`key_revoked` (a revoked key's roles cannot change) or `last_admin` (the `admin` role cannot "
                  "be taken from the last live key holding it).", {})},
    body=shapes.SetRoles, body_note="The key's roles from now on.", headers=_PRIVATE)

