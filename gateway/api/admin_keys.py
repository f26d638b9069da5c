"""Key administration over HTTP, for keys with the ``admin`` role: ``/admin/keys`` (thin).

Every rule lives in :class:`gateway.keys_admin.KeyAdmin` (which a console
page can call too); this module reads the bodies and the query strictly
(``gateway/api/admin_keys_shapes.py``), hands over, and maps the service's
refusals to OpenAI-shaped errors. The ``key_admin`` dependency refuses a
non-admin (403) before any body is read, so a non-admin learns nothing from
body errors. Litestar sees neither bodies nor query, so their description
comes from ``gateway/api/admin_keys_openapi.py``.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath

from gateway import urls
from gateway.api.admin_keys_openapi import (CREATE_OPERATION, GET_OPERATION, LIST_OPERATION, LIST_PARAMS,
                                            REVOKE_OPERATION, ROLES_OPERATION)
from gateway.api.admin_keys_shapes import CreateKey, SetRoles, key_document, parse
from gateway.api.openapi import SECURITY
from gateway.api.bodies import read_body
from gateway.api_errors import ApiError
from gateway.auth import Principal
from gateway.keys_admin import KeyChangeSignal
from gateway.query_flags import FLAG_SPELLINGS, read_flag
from gateway.keys_admin.service import (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, InvalidField, KeyAdmin, KeyAdminError,
                                        KeyChange, KeyIsRevoked, KeyNotFound, KeysUnavailable, LastAdmin, NotAdmin,
                                        UnknownCursor, UnknownRole)

#: Service refusal -> (status, code).
_ERRORS: dict[type[KeyAdminError], tuple[int, str]] = {
    NotAdmin: (403, "admin_forbidden"),
    InvalidField: (422, "invalid_value"),
    UnknownRole: (422, "unknown_role"),
    UnknownCursor: (400, "invalid_parameter"),
    KeyNotFound: (404, "key_not_found"),
    KeyIsRevoked: (409, "key_revoked"),
    LastAdmin: (409, "last_admin"),
    KeysUnavailable: (503, "keys_unavailable"),
}


def api_error(refusal: KeyAdminError) -> ApiError:
    """The HTTP error of a service refusal."""
    status, code = _ERRORS[type(refusal)]
    return ApiError(status, code, refusal.message, param=refusal.param)


def provide_key_admin(state: State, principal: NamedDependency[Principal]) -> KeyAdmin:
    """The service, acting as the caller; 403 ``admin_forbidden`` unless the key has the ``admin`` role."""
    components = state.components
    signal = KeyChangeSignal(components.redis, components.auth.cache,
                             on_change=components.completions.admitted_keys.changed)
    try:
        return KeyAdmin(components.keys, principal, policy_dir=components.settings.policy_dir, signal=signal,
                        cache_ttl_s=components.settings.auth_cache_ttl_s)
    except NotAdmin as refusal:
        raise api_error(refusal) from None


#: On every answer: a created key's secret, and in all of them users, teams, roles and notes, which no cache
#: should keep (probe s56 F5: only the create said so).
NO_STORE = {"Cache-Control": "no-store"}


class AdminKeysController(Controller):
    path = urls.ADMIN_KEYS
    tags = ["admin"]
    security = SECURITY
    dependencies = {"key_admin": Provide(provide_key_admin, sync_to_thread=False)}

    @post("/", summary="Create an API key (its secret is shown once)", operation_id="createKey",
          operation_class=CREATE_OPERATION, status_code=201)
    async def create(self, request: Request, key_admin: NamedDependency[KeyAdmin]) -> Response[dict[str, Any]]:
        no_query(request)
        body = parse(await read_body(request), CreateKey)
        try:
            issued = await key_admin.create(body.user, team=body.team, roles=body.roles, note=body.note)
        except KeyAdminError as refusal:
            raise api_error(refusal) from None
        return Response({**key_document(issued.key), "key": issued.secret}, status_code=201, headers=NO_STORE)

    @get("/", summary="List API keys", operation_id="listKeys", operation_class=LIST_OPERATION)
    async def list_keys(self, request: Request, key_admin: NamedDependency[KeyAdmin]) -> Response[dict[str, Any]]:
        limit, cursor, include_revoked = list_query(request)
        try:
            page = await key_admin.page(cursor=cursor, limit=limit, include_revoked=include_revoked)
        except KeyAdminError as refusal:
            raise api_error(refusal) from None
        return Response({"object": "list", "data": [key_document(row) for row in page.keys],
                         "has_more": page.has_more, "next_cursor": page.next_cursor}, headers=NO_STORE)

    @get(urls.ADMIN_KEY, summary="One API key", operation_id="retrieveKey", operation_class=GET_OPERATION)
    async def retrieve(self, request: Request, key_admin: NamedDependency[KeyAdmin],
                       key_id: FromPath[str]) -> Response[dict[str, Any]]:
        no_query(request)
        try:
            return Response(key_document(await key_admin.get(key_id)), headers=NO_STORE)
        except KeyAdminError as refusal:
            raise api_error(refusal) from None

    @post(f"{urls.ADMIN_KEY}/revoke", summary="Revoke an API key (at once, on every gateway)",
          operation_id="revokeKey", operation_class=REVOKE_OPERATION, status_code=200)
    async def revoke(self, request: Request, key_admin: NamedDependency[KeyAdmin],
                     key_id: FromPath[str]) -> Response[dict[str, Any]]:
        no_query(request)
        try:
            return _changed(await key_admin.revoke(key_id))
        except KeyAdminError as refusal:
            raise api_error(refusal) from None

    @put(f"{urls.ADMIN_KEY}/roles", summary="Replace an API key's roles", operation_id="setKeyRoles",
         operation_class=ROLES_OPERATION)
    async def set_roles(self, request: Request, key_admin: NamedDependency[KeyAdmin],
                        key_id: FromPath[str]) -> Response[dict[str, Any]]:
        no_query(request)
        body = parse(await read_body(request), SetRoles)
        try:
            return _changed(await key_admin.set_roles(key_id, body.roles))
        except KeyAdminError as refusal:
            raise api_error(refusal) from None


def _changed(change: KeyChange) -> Response[dict[str, Any]]:
    return Response({**key_document(change.key), "changed": change.changed,
                     "gateways_told": change.warning is None, "warning": change.warning}, headers=NO_STORE)


def no_query(request: Request) -> None:
    """The routes that take no query parameter refuse one, as the list refuses one it does not take."""
    for name in request.query_params:
        shown = name[:64]
        raise ApiError(400, "unsupported_parameter", f"Unsupported parameter: '{shown}' is not accepted here.",
                       param=shown)


def list_query(request: Request) -> tuple[int, str | None, bool]:
    """``GET /admin/keys``'s query, read strictly: (limit, cursor, include_revoked)."""
    query = {name: list(values) for name, values in request.query_params.dict().items()}
    for name, values in query.items():
        if name not in LIST_PARAMS:
            shown = name[:64]
            raise ApiError(400, "unsupported_parameter", f"Unsupported parameter: '{shown}' is not accepted here.",
                           param=shown)
        if len(values) != 1:
            raise ApiError(400, "invalid_parameter", f"'{name}' may be given once.", param=name)
    limit_text = query.get("limit", [str(DEFAULT_PAGE_SIZE)])[0]
    if not (limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 6
            and 1 <= int(limit_text) <= MAX_PAGE_SIZE):
        raise ApiError(400, "invalid_parameter", f"'limit' must be a whole number from 1 to {MAX_PAGE_SIZE}.",
                       param="limit")
    include_revoked = read_flag(query.get("include_revoked", ["false"])[0])
    if include_revoked is None:
        raise ApiError(400, "invalid_parameter", f"'include_revoked' must be {FLAG_SPELLINGS}.",
                       param="include_revoked")
    cursor = query.get("cursor", [None])[0]
    return int(limit_text), cursor, include_revoked

