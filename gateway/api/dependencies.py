"""Dependencies the controllers declare: the caller's principal and the services."""

from __future__ import annotations

from litestar import Request
from litestar.datastructures import State

from gateway.api_errors import ApiError
from gateway.auth import KeyStoreError, Principal
from gateway.auth.keys import well_formed
from gateway.auth.refusals import (MALFORMED_HEADER, MISSING, NOT_A_KEY, SEVERAL_HEADERS, UNKNOWN_OR_REVOKED,
                                   log_refused, presented_key_id)
from gateway.requests.service import CompletionService

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def provide_principal(request: Request, state: State) -> Principal:
    """Authenticate the bearer key; 401 when missing, unknown or revoked, 503 when the store is down.

    A key seen recently is answered from the principal cache on the event
    loop; only a miss reaches the database, on a worker thread
    (``gateway/auth/authenticator.py``).
    """
    given = request.headers.getall("authorization", [])
    client = request.client.host if request.client else None

    def refused(reason: str, key_id: str | None = None) -> None:
        log_refused(reason, key_id=key_id, client=client, where=request.scope.get("path_template") or "?")

    if len(given) > 1:
        refused(SEVERAL_HEADERS)  # which one counts would be a guess (a proxy adding its own, a client sending two)
        raise ApiError(401, "invalid_api_key", "Send one Authorization header, not several.", headers=_CHALLENGE)
    header = given[0] if given else ""
    scheme, _, token = header.partition(" ")
    if not header:
        refused(MISSING)
        raise ApiError(401, "missing_api_key",
                       "No API key given. Send 'Authorization: Bearer gk_…' (create one with 'govgate keys create').",
                       headers=_CHALLENGE)
    if scheme.lower() != "bearer" or not token.strip():
        refused(MALFORMED_HEADER)
        raise ApiError(401, "invalid_api_key", "The Authorization header must be 'Bearer <key>'.",
                       headers=_CHALLENGE)
    try:
        principal = await state.components.auth.authenticate(token.strip())
    except KeyStoreError:
        raise ApiError(503, "auth_unavailable",
                       "API keys cannot be checked right now (the database is unavailable).") from None
    if principal is None:
        presented = token.strip()
        refused(UNKNOWN_OR_REVOKED if well_formed(presented) else NOT_A_KEY, presented_key_id(presented))
        raise ApiError(401, "invalid_api_key", "The API key is unknown or has been revoked.", headers=_CHALLENGE)
    return principal


def completion_service(state: State) -> CompletionService:
    """The request path's service, built once in the app's lifespan.

    Read from the state by the completion handlers rather than injected:
    see ``gateway/api/completions.py``.
    """
    return state.components.completions
