"""What the app gets from this package: the request middleware around everything, and ``/metrics``."""

from __future__ import annotations

from litestar import Litestar

from gateway.observability.middleware import RequestContextMiddleware
from gateway.settings import Settings


def instrument(settings: Settings, app: Litestar) -> Litestar:
    """Wrap ``app``'s ASGI handler (every HTTP request, routed or not) and add ``/metrics`` if enabled.

    The wrap is on ``app.asgi_handler``, the exception-handling stack Litestar
    builds around its router: Litestar's own ``middleware=`` run only for
    requests that matched a route, and a 404 must carry a request id too.
    """
    if settings.metrics_enabled:
        from gateway.api.metrics import MetricsController

        app.register(MetricsController)
    app.asgi_handler = RequestContextMiddleware(app.asgi_handler, log_access=settings.access_log)
    return app
