"""Dependencies the controllers declare: the caller's principal and the services."""

from __future__ import annotations

from litestar import Request
from litestar.datastructures import State

from gateway.auth import KeyStoreError, Principal
from gateway.api_errors import ApiError
from gateway.requests.service import CompletionService

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def provide_principal(request: Request, state: State) -> Principal:
    """Authenticate the bearer key; 401 when missing, unknown or revoked, 503 when the store is down.

    A key seen recently is answered from the principal cache on the event
    loop; only a miss reaches the database, on a worker thread
    (``gateway/auth/authenticator.py``).
    """
    given = request.headers.getall("authorization", [])
    if len(given) > 1:  # which one counts would be a guess (a proxy adding its own, a client sending two)
        raise ApiError(401, "invalid_api_key", "Send one Authorization header, not several.", headers=_CHALLENGE)
    header = given[0] if given else ""
    scheme, _, token = header.partition(" ")
    if not header:
        raise ApiError(401, "missing_api_key",
                       "No API key given. Send 'Authorization: Bearer gk_…' (create one with 'govgate keys create').",
                       headers=_CHALLENGE)
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "invalid_api_key", "The Authorization header must be 'Bearer <key>'.",
                       headers=_CHALLENGE)
    try:
        principal = await state.components.auth.authenticate(token.strip())
    except KeyStoreError:
        raise ApiError(503, "auth_unavailable",
                       "API keys cannot be checked right now (the database is unavailable).") from None
    if principal is None:
        raise ApiError(401, "invalid_api_key", "The API key is unknown or has been revoked.", headers=_CHALLENGE)
    return principal


def completion_service(state: State) -> CompletionService:
    """The request path's service, built once in the app's lifespan.

    Read from the state by the completion handlers rather than injected:
    see ``gateway/api/completions.py``.
    """
    return state.components.completions
