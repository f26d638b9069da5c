"""The review console: server-rendered pages for reviewers and auditors, a view over the review service,
and a keys page for admins, a view over :class:`gateway.keys_admin.KeyAdmin`.

Mounted under ``/console`` by ``gateway/app.py`` (:func:`console_router` and
the template config). Pages call :class:`gateway.review.service.ReviewService`
with the signed-in key's access, exactly as the review API does, so what
a console user may see and do, and what is audited, is decided in one
place. README "Review console"; docs/architecture.md "The review console".
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from litestar import Request, Response, Router
from litestar.datastructures import ResponseHeader
from litestar.di import Provide
from litestar.exceptions import NotFoundException
from litestar.static_files import create_static_files_router

from gateway import urls
from gateway.console.actions import NotAPage, ReviewActions, SignIn
from gateway.console.errors import EXCEPTION_HANDLERS
from gateway.console.pages import ConsolePages
from gateway.console.render import SECURITY_HEADERS, TEMPLATE_CONFIG
from gateway.console.keys import KeysPage
from gateway.console.signin import provide_reviewer, provide_user

STATIC_DIR: Final = Path(__file__).parent / "static"


async def _no_nul(request: Request) -> None:
    """A NUL in a static file's path names no file: a 404 page, not the ``ValueError`` ``os.stat`` raises (a 500)."""
    if "\x00" in request.url.path:
        raise NotFoundException()


async def _secured(response: Response) -> Response:
    """The static files' responses carry the pages' headers too (the static router takes no headers)."""
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = "public, max-age=3600"  # a stylesheet holds no prompt
    return response


def console_router() -> Router:
    """A router of the console (one per app: a Litestar router belongs to the app it is registered on)."""
    return Router(
        path=urls.CONSOLE,
        route_handlers=[ConsolePages, ReviewActions, KeysPage, SignIn, NotAPage,
                        create_static_files_router(path=urls.CONSOLE_STATIC.removeprefix(urls.CONSOLE),
                                                   directories=[STATIC_DIR], name="console-static",
                                                   before_request=_no_nul, after_request=_secured)],
        dependencies={"reviewer": Provide(provide_reviewer), "user": Provide(provide_user)},
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        response_headers=[ResponseHeader(name=name, value=value) for name, value in SECURITY_HEADERS.items()],
        include_in_schema=False,
    )


__all__ = ["TEMPLATE_CONFIG", "console_router"]
