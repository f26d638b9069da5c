"""``OPTIONS`` answered with the methods a path really has, from the router itself.

Litestar adds an ``OPTIONS`` handler to each route, whose ``Allow`` is the
methods of the route as first registered: when handlers for the same path
come in more than one registration (``/admin/keys``: ``POST`` to create,
``GET`` to list), the route is rebuilt with all of them but keeps the first
``OPTIONS`` handler, so ``OPTIONS /admin/keys`` said ``OPTIONS, POST``
without ``GET``. The router's own table is right (its 405 names every
method), so this layer asks it: it routes the path with a method no route
has and reads the ``Allow`` of the refusal. A known path gets ``204`` with
``Allow`` listing them in order (``HEAD`` where the path has it, ``OPTIONS``
always); an unknown path, and a mount (the console's static files), go on
to the app as before (a 404 in OpenAI's shape; the mount answers for
itself). It wraps Litestar's ASGI handler inside the request-context
middleware, so the answer carries a request id and is counted like any.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from litestar.exceptions import MethodNotAllowedException
from litestar.utils import normalize_path

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
#: Routed to learn a path's methods: no route has it, so the router refuses it naming those it has.
_PROBE = "GOVGATE-ALLOW-PROBE"


class AllowedMethods:
    """Answer ``OPTIONS`` on a routed path with ``204`` and the ``Allow`` the router knows."""

    def __init__(self, app: ASGIApp, router: Any) -> None:
        self.app = app
        self.router = router  # the app's ASGIRouter (routes registered later are seen: it is asked per request)

    def allowed(self, path: str) -> list[str] | None:
        """The methods ``path`` answers, sorted; None for no route, or a mount that answers for itself."""
        try:
            self.router.handle_routing(path=normalize_path(path), method=_PROBE)
        except MethodNotAllowedException as refusal:
            header = (refusal.headers or {}).get("allow", "")
            return sorted({method.strip() for method in header.split(",") if method.strip()})
        except Exception:  # NotFoundException and the like: the app answers (and shapes) it
            return None
        return None

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("method") != "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if root_path := scope.get("root_path", ""):
            path = path.split(root_path, maxsplit=1)[-1]
        allowed = self.allowed(path)
        if allowed is None:
            await self.app(scope, receive, send)
            return
        try:  # the route's template, for the request's metrics and access line (as a routed request has)
            scope["path_template"] = self.router.handle_routing(path=normalize_path(path), method="OPTIONS")[4]
        except Exception:
            pass
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(b"allow", ", ".join(allowed).encode("latin-1"))]})
        await send({"type": "http.response.body", "body": b""})
