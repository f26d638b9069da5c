"""Where the OpenAPI document and its browsable pages are served (``/schema``), with JSON 404s.

The document is public on purpose (README, "The API"): ``/schema/openapi.json``
(and ``.yaml``/``.yml``), ReDoc at ``/schema`` and ``/schema/redoc``, Swagger
UI at ``/schema/swagger``, Stoplight Elements and RapiDoc at
``/schema/elements`` and ``/schema/rapidoc``: Litestar's pages, their files
pinned by hash (``gateway/api/schema_pages.py``). Litestar also routes every other path under ``/schema`` to a handler
of its own that answers an HTML "404 Not found" page (not an exception, so
the app's handlers never see it): a client that mistyped a path got HTML
where every other unknown path gets OpenAI's JSON error. The router here is
Litestar's own ``/schema`` router with one ``after_request`` that turns
that page into the API's 404.
"""

from __future__ import annotations

from litestar import Response, Router

from gateway.api_errors import ApiError, not_found_message

SCHEMA_PATH = "/schema"


#: On every ``/schema`` answer. The pages share the console's origin: framed by another site they could be
#: clickjacked, and sniffed as something else they could run as script (probe s56 F3). No ``script-src``: the
#: renderers run inline scripts and CDN files (pinned by hash) this offline machine cannot load to check a
#: narrower policy against; what is set restricts nothing they use.
SCHEMA_SECURITY_HEADERS = {
    "Content-Security-Policy": "frame-ancestors 'none'; base-uri 'none'; form-action 'none'; object-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _json_not_found(response: Response) -> Response:
    """Litestar's HTML 404 page for an unknown ``/schema/…`` path, as the API's JSON 404; every answer with
    :data:`SCHEMA_SECURITY_HEADERS`."""
    if response.status_code == 404:
        response = ApiError(404, "not_found", not_found_message()).to_response()
    response.headers.update(SCHEMA_SECURITY_HEADERS)
    return response


def schema_router() -> Router:
    """The router Litestar's OpenAPI plugin adds its pages to (``OpenAPIConfig.openapi_router``)."""
    return Router(SCHEMA_PATH, route_handlers=[], include_in_schema=False, after_request=_json_not_found)
