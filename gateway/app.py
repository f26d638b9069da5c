"""The Litestar application: controllers, error shapes, lifespan."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Callable

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from gateway.api.admin_keys import AdminKeysController
from gateway.api.completions import CompletionsController
from gateway.api.dependencies import provide_principal
from gateway.api.health import HealthController
from gateway.api.openapi import COMPONENTS
from gateway.api.models import ModelsController
from gateway.api.review import ReviewController
from gateway.components import Components, build_components
from gateway.console import TEMPLATE_CONFIG, console_router
from gateway.api_errors import EXCEPTION_HANDLERS
from gateway.observability.setup import instrument
from gateway.settings import Settings

ComponentsFactory = Callable[[Settings], contextlib.AbstractAsyncContextManager[Components]]


def create_app(settings: Settings | None = None, *, components: ComponentsFactory = build_components) -> Litestar:
    """Build the app; ``components`` lets tests bring their own parts."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with components(settings) as built:
            app.state.components = built
            yield

    return instrument(settings, Litestar(
        route_handlers=[CompletionsController, ModelsController, HealthController, ReviewController,
                        AdminKeysController, console_router()],
        dependencies={"principal": Provide(provide_principal)},
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        request_max_body_size=settings.max_body_bytes,
        template_config=TEMPLATE_CONFIG,
        openapi_config=OpenAPIConfig(title="govgate", version="0.1.0", components=COMPONENTS),
        debug=False,
        logging_config=None,  # logging is set up once per process (gateway/observability/logs.py), not replaced here
    ))


def app_from_env() -> Litestar:
    """uvicorn factory entry point: ``uvicorn --factory gateway.app:app_from_env``."""
    return create_app(Settings.from_env())
