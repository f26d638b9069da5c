"""The console's forms (POST): sign in, sign out, and the review actions on a request (the keys page's are
in :mod:`gateway.console.keys`).

Every form is checked for its CSRF token first (:mod:`gateway.console.csrf`).
A review action is the review API's (``parse_action`` reads the fields as
the API reads a JSON body, then ``ReviewService.act``), so it lands on the
chain as the same ``flagged``/``commented``/``dispositioned`` entry; an
auditor's post is refused there (403), not only hidden from the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import anyio.to_thread
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Redirect, Template

from gateway import urls
from gateway.auth.keys import well_formed
from gateway.auth.refusals import MISSING, NOT_A_KEY, UNKNOWN_OR_REVOKED, log_refused, presented_key_id
from gateway.console import csrf
from gateway.console.errors import error_page
from gateway.console.pages import checked_request_id, refused, service
from gateway.console.forms import read_form
from gateway.console.render import SECURITY_HEADERS, page
from gateway.console.signin import (SESSION_COOKIE, SIGN_IN_COOKIE, Reviewer, cookie, may_review, may_use_console,
                                    safe_next, session_store)
from gateway.review.actions import parse_action

#: The fields each action's form may send (beside the CSRF token).
ACTION_FIELDS: Final = {"flag": ("note",), "comment": ("text",), "disposition": ("disposition", "note")}
_SIGN_IN_COOKIE_S: Final = 3600
#: The sign-in page's parameters, as the redirect to it sets them (``gateway/console/errors.py``): the page to go
#: back to and that a session ended. Any other is refused as on the other pages (it was ignored, a 200).
SIGN_IN_PARAMS: Final = ("next", "why")


async def _form(request: Request) -> dict[str, Any]:
    form = await read_form(request)
    return {name: form.get(name) for name in form}


class ReviewActions(Controller):
    """Flag, comment, dispose: reviewers only."""

    @post(urls.CONSOLE_REQUEST.removeprefix(urls.CONSOLE) + "/{action:str}", name="console-act", status_code=303)
    async def act(self, request: Request, state: State, reviewer: NamedDependency[Reviewer], request_id: FromPath[str],
                  action: FromPath[str]) -> Response:
        form = await _form(request)
        csrf.check(reviewer.session.csrf, form.get(csrf.FIELD))
        reviewer.access.require_reviewer()
        if action not in ACTION_FIELDS:
            return error_page(404, "not_found", "There is no such action on a request.")
        fields = {name: form[name] for name in ACTION_FIELDS[action]
                  if isinstance(form.get(name), str) and form[name].strip()}
        checked = parse_action(action, msgspec.json.encode(fields))
        await service(state).act(reviewer.access, checked_request_id(request_id), action, checked)
        return Redirect(urls.console_request(request_id) + f"?done={action}", status_code=303,
                        headers=SECURITY_HEADERS)


class SignIn(Controller):
    """Sign in with a key (the one console page open without a session); sign out."""

    @get(urls.CONSOLE_SIGN_IN.removeprefix(urls.CONSOLE), name="console-sign-in-form")
    async def form(self, request: Request) -> Template:
        refused(request, SIGN_IN_PARAMS)
        return _sign_in_page(request, status=200, message=None)

    @post(urls.CONSOLE_SIGN_IN.removeprefix(urls.CONSOLE), name="console-sign-in", status_code=303)
    async def sign_in(self, request: Request, state: State) -> Any:
        form = await _form(request)
        csrf.check(request.cookies.get(SIGN_IN_COOKIE), form.get(csrf.FIELD))
        key, after = form.get("key"), safe_next(form.get("next"))
        principal = None
        if isinstance(key, str) and key.strip():
            # The store itself, not the principal cache: signing in is rare, and must see a revocation at once.
            principal = await anyio.to_thread.run_sync(state.components.keys.authenticate, key.strip())
        if principal is None:
            presented = key.strip() if isinstance(key, str) else ""
            log_refused(MISSING if not presented else UNKNOWN_OR_REVOKED if well_formed(presented) else NOT_A_KEY,
                        key_id=presented_key_id(presented), client=request.client.host if request.client else None,
                        where=urls.CONSOLE_SIGN_IN)
            return _sign_in_page(request, status=401, after=after,
                                 message="That key is unknown or has been revoked.")
        if not may_use_console(principal):
            return _sign_in_page(request, status=403, after=after, message=(
                "This key may not use the review console: it needs the 'reviewer' or 'auditor' role "
                "(or 'admin', for the keys page)."))
        if not may_review(principal) and not after.startswith(urls.CONSOLE_KEYS):
            after = urls.CONSOLE_KEYS  # an admin-only key would be refused the review pages
        store = session_store(state)
        await store.end(request.cookies.get(SESSION_COOKIE))  # a session this browser had is not left behind
        session = await store.open(principal.key_id)
        response = Redirect(after, status_code=303, headers=SECURITY_HEADERS)
        response.set_cookie(cookie(request, SESSION_COOKIE, session.token))
        response.delete_cookie(SIGN_IN_COOKIE, path=urls.CONSOLE)
        return response

    @post(urls.CONSOLE_SIGN_OUT.removeprefix(urls.CONSOLE), name="console-sign-out", status_code=303)
    async def sign_out(self, request: Request, state: State, user: NamedDependency[Reviewer]) -> Redirect:
        form = await _form(request)
        csrf.check(user.session.csrf, form.get(csrf.FIELD))
        await session_store(state).end(user.session.token)
        response = Redirect(urls.CONSOLE_SIGN_IN, status_code=303, headers=SECURITY_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path=urls.CONSOLE)
        return response


class NotAPage(Controller):
    """Any other path under ``/console``: a 404 page, not the API's JSON 404."""

    @get("/{rest:path}", name="console-not-found", status_code=404)
    async def missing(self, rest: FromPath[Path]) -> Response:
        return error_page(404, "not_found", "There is no such console page.")


def _sign_in_page(request: Request, *, status: int, message: str | None, after: str | None = None) -> Template:
    """The sign-in form with a fresh double-submit token (its cookie set beside it)."""
    token = csrf.new_token()
    why = request.query_params.get("why")
    notice = "Your session ended (signed out, timed out, or the key changed); sign in again." if why else None
    response = page("sign_in.html", status=status, token=token, message=message, notice=notice,
                    next=after or safe_next(request.query_params.get("next")))
    response.set_cookie(cookie(request, SIGN_IN_COOKIE, token, max_age=_SIGN_IN_COOKIE_S))
    return response
