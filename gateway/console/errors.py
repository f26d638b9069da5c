"""Console refusals as pages: a person reads them, so they are HTML with the same code the API would use.

The review service raises :class:`gateway.api_errors.ApiError` (OpenAI's
shape for API clients); under ``/console`` the same refusal is a page with
its status, its code and its message, so a bad date or an unknown request
id is a clear 4xx page, never a 500. A missing session is a redirect to the
sign-in page.
"""

from __future__ import annotations

import logging
from urllib.parse import urlencode, urlsplit

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.response import Redirect

from gateway import urls
from gateway.allowed_methods import allow_list
from gateway.api_errors import ApiError, new_request_id
from gateway.auth import KeyStoreError
from gateway.console.csrf import CsrfRefused
from gateway.console.forms import FieldRepeated
from gateway.console.render import SECURITY_HEADERS, page
from gateway.console.sessions import SessionStoreDown
from gateway.console.signin import PageRefused, Reviewer, SignInRequired
from gateway.observability.context import current_request_id

log = logging.getLogger(__name__)

_TITLES = {400: "Bad request", 403: "Not allowed", 404: "Not found", 405: "Not allowed", 413: "Too large",
           422: "Cannot do that", 500: "Something went wrong", 503: "Unavailable"}


def error_page(status: int, code: str, message: str, *, user: Reviewer | None = None,
               headers: dict[str, str] | None = None) -> Response:
    """A refusal as a page; with ``user``, the signed-in nav and a way back to the pages that key may use."""
    return page("error.html", status=status, title=_TITLES.get(status, "Error"), code=code, message=message,
                back=user.home if user else urls.CONSOLE_QUEUE, user=user, headers=headers)


def _refused(_: Request, exc: PageRefused) -> Response:
    return error_page(403, "console_forbidden", exc.message, user=exc.user)


def _back_to(request: Request) -> str | None:
    """Where to come back after signing in again: this page (with its query: a search link keeps its filters);
    for a form sent after the session ended, the console page it was sent from (the request being reviewed,
    not the queue), as the same-origin ``Referer`` names it."""
    if request.method == "GET":
        return request.url.path + (f"?{request.url.query}" if request.url.query else "")
    sent_from = urlsplit(request.headers.get("referer", ""))
    if sent_from.netloc != request.url.netloc or not sent_from.path.startswith(urls.CONSOLE + "/"):
        return None
    return sent_from.path + (f"?{sent_from.query}" if sent_from.query else "")


def _sign_in(request: Request, exc: SignInRequired) -> Response:
    back = _back_to(request)
    query = {"next": back} if back else {}
    if exc.reason:
        query["why"] = "ended"
    target = urls.CONSOLE_SIGN_IN + (f"?{urlencode(query)}" if query else "")
    return Redirect(target, status_code=303, headers=SECURITY_HEADERS)


def _api(_: Request, exc: ApiError) -> Response:
    # its headers too: a stopping gateway's 503 tells the browser when to come back (Retry-After)
    return error_page(exc.status, exc.code, exc.message, headers=exc.headers or None)


def _csrf(_: Request, __: CsrfRefused) -> Response:
    return error_page(403, "csrf_refused", "This form was refused: its security token is missing or out of date. "
                      "Go back, reload the page and try again.")


def _repeated(_: Request, exc: FieldRepeated) -> Response:
    return error_page(400, "invalid_request", f"This form sent the field '{exc.name}' more than once, so it was "
                      "not acted on. Go back, reload the page and send it again.")


def _sessions_down(_: Request, exc: SessionStoreDown) -> Response:
    log.error("console: session store (Redis) unavailable: %s", exc)
    return error_page(503, "console_unavailable", "The console cannot check sessions right now (Redis is not "
                      "answering), so nobody is let in. Try again shortly.")


def _keys_down(_: Request, exc: KeyStoreError) -> Response:
    log.error("console: key store unavailable: %s", exc)
    return error_page(503, "auth_unavailable", "Keys cannot be checked right now (the database is unavailable).")


def http_error_page(_: Request, exc: HTTPException) -> Response:
    """Litestar's own refusals (no such page, a method a page does not take, a form too large) as a page."""
    status = exc.status_code
    messages = {404: "There is no such console page.", 405: "This page does not accept that method.",
                413: "The form is larger than this gateway accepts."}
    allow = {name: value for name, value in (exc.headers or {}).items() if name.lower() == "allow"}
    return error_page(status, "not_found" if status == 404 else "invalid_request",
                      messages.get(status, str(exc.detail)),
                      headers={"Allow": ", ".join(allow_list(value)) for value in allow.values()} or None)


def _unexpected(request: Request, exc: Exception) -> Response:
    request_id = current_request_id() or new_request_id()  # the X-Govgate-Request-Id header's and the log's id
    log.exception("console: unhandled error on %s %s (request id %s)", request.method, request.url.path, request_id)
    return error_page(500, "internal_error", f"The console hit an unexpected error; it has been logged (request id "
                      f"{request_id}).")


EXCEPTION_HANDLERS = {
    SignInRequired: _sign_in,
    PageRefused: _refused,
    ApiError: _api,
    CsrfRefused: _csrf,
    FieldRepeated: _repeated,
    SessionStoreDown: _sessions_down,
    KeyStoreError: _keys_down,
    HTTPException: http_error_page,
    Exception: _unexpected,
}
