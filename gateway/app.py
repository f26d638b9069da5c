"""The Litestar application: controllers, error shapes, lifespan."""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import AsyncIterator, Awaitable, Callable

from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig

from audit import AuditStore
from gateway.api.admin_keys import AdminKeysController
from gateway.api.completions import CompletionsController
from gateway.api.dependencies import provide_principal
from gateway.api.health import HealthController
from gateway.api.openapi import COMPONENTS
from gateway.api.schema_site import schema_router
from gateway.api.schema_pages import render_plugins
from gateway.api.models import ModelsController
from gateway.api.review import ReviewController
from gateway.components import Components, build_components
from gateway.console import TEMPLATE_CONFIG, console_router
from gateway import urls
from gateway.allowed_methods import AllowedMethods
from gateway.api_errors import EXCEPTION_HANDLERS, http_exception_handler
from gateway.console.errors import http_error_page
from gateway.cut_ends import wait_for_cut_ends
from gateway.stop_timing import CUT_ENDS_WAIT_S, FORCED_CUT_ENDS_WAIT_S
from gateway.drain import Drain
from gateway.drain_reads import DrainEndsBodyReads
from gateway.forced_stop import ForcedStop
from gateway.expect_continue import CloseUnreadContinue
from gateway.observability.setup import instrument
from gateway.settings import Settings

log = logging.getLogger(__name__)

ComponentsFactory = Callable[[Settings], contextlib.AbstractAsyncContextManager[Components]]


def freeze_startup_heap() -> None:
    """Move everything made at startup out of the garbage collector's reach, once the process is up.

    The app, its imports and its parts are some 140,000 tracked objects that
    live as long as the process. Left to the collector, each full
    (generation 2) collection walked them all: measured during
    ``bench/fairness.py``, a 50 ms stall every 6–8 s of load, every
    request in flight held for it. Frozen (:func:`gc.freeze`, after one
    collection so no startup garbage is kept), a full collection walks only
    what was made since: ~3 ms. Reference counting still frees frozen
    objects as usual; only a cycle among them would never be collected.
    """
    gc.collect()
    gc.freeze()
    log.info("startup heap frozen: %d objects out of the garbage collector's reach", gc.get_freeze_count())


def _forced_cut_ends(drain: Drain, audit: AuditStore) -> Callable[[float], Awaitable[None]]:
    """A forced stop's wait for the ends of the requests its cut ended, bounded by
    :data:`~gateway.stop_timing.FORCED_CUT_ENDS_WAIT_S` and the forced stop's own bound: without it a second
    Ctrl-C signed before a cut stream's worker recorded its end, milliseconds later, and ``govgate audit verify``
    run while the stack was down said UNVERIFIED (probe s55 F2). Not cut short by the hurry, which is what a
    forced stop is."""
    async def wait(within_s: float) -> None:
        await wait_for_cut_ends(drain.cut_requests, audit, bound_s=min(within_s, FORCED_CUT_ENDS_WAIT_S))
    return wait


def create_app(settings: Settings | None = None, *, components: ComponentsFactory = build_components,
               freeze_heap: bool = False, drain: Drain | None = None,
               forced_stop: ForcedStop | None = None) -> Litestar:
    """Build the app; ``components`` lets tests bring their own parts.

    ``freeze_heap``: :func:`freeze_startup_heap` once the parts are built; for the served process
    (:func:`app_from_env`), not for tests that make many apps in one process.
    ``drain``: what a stop runs (``gateway/serving.py`` holds the same one); by default one nobody starts.
    ``forced_stop``: where the app registers what a forced stop must still do (the closing checkpoint), for
    the server that runs it (``gateway/serving.py``).
    """
    settings = settings or Settings.from_env()
    drain = drain or Drain(settings.drain_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with components(settings) as built:
            app.state.components = built
            app.state.drain = drain
            checkpointer = built.checkpointer
            forgets = []
            if forced_stop is not None and checkpointer is not None:
                if built.audit is not None:  # first: the closing checkpoint then signs the ends it waited for
                    forgets.append(forced_stop.add("the ends of the requests the stop cut",
                                                   _forced_cut_ends(drain, built.audit)))
                forgets.append(forced_stop.add("the closing audit checkpoint", checkpointer.aclose))
            if freeze_heap:
                freeze_startup_heap()
            try:
                yield
            finally:
                if drain.cut_requests and built.audit is not None:  # signed by the closing checkpoint below
                    await wait_for_cut_ends(drain.cut_requests, built.audit, bound_s=CUT_ENDS_WAIT_S,
                                            hurried=lambda: drain.hurried)
                for forget in forgets:  # a clean stop: done above, and the components' own close writes it
                    forget()

    app = Litestar(
        route_handlers=[CompletionsController, ModelsController, HealthController, ReviewController,
                        AdminKeysController, console_router()],
        dependencies={"principal": Provide(provide_principal)},
        exception_handlers={**EXCEPTION_HANDLERS, HTTPException: _routing_error},
        lifespan=[lifespan],
        request_max_body_size=settings.max_body_bytes,
        template_config=TEMPLATE_CONFIG,
        openapi_config=OpenAPIConfig(title="govgate", version="0.1.0", components=COMPONENTS,
                                     openapi_router=schema_router(), render_plugins=render_plugins()),
        debug=False,
        logging_config=None,  # logging is set up once per process (gateway/observability/logs.py), not replaced here
    )
    app.asgi_handler = AllowedMethods(app.asgi_handler, app.asgi_router)  # OPTIONS: see gateway/allowed_methods.py
    # a body still arriving at a stop, or starting during it, is refused (any endpoint): gateway/drain_reads.py
    app.asgi_handler = DrainEndsBodyReads(app.asgi_handler, drain)
    # outside it: a body the drain refused unread was never asked for (no "100 Continue"), so that answer closes
    app.asgi_handler = CloseUnreadContinue(app.asgi_handler)  # see gateway/expect_continue.py
    return instrument(settings, app)


def _routing_error(request: Request, exc: HTTPException) -> Response:
    """Litestar's routing refusals (404, 405) are raised before any router's handlers run: under the
    console they are its pages (with its headers), elsewhere OpenAI's error shape."""
    path = request.url.path
    if path == urls.CONSOLE or path.startswith(urls.CONSOLE + "/"):
        return http_error_page(request, exc)
    return http_exception_handler(request, exc)


def app_from_env() -> Litestar:
    """uvicorn factory entry point: ``uvicorn --factory gateway.app:app_from_env``.

    Such a server stops as uvicorn does, without the drain ``govgate serve`` runs (``gateway/serving.py``).
    """
    return create_app(Settings.from_env(), freeze_heap=True)
