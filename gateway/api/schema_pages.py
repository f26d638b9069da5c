"""The browsable pages of the OpenAPI document, whose scripts come from a CDN pinned by their hashes.

The pages (ReDoc, Swagger UI, Stoplight Elements, RapiDoc: Litestar's own
renderers) load their scripts and stylesheets from public CDNs, and they are
served on the gateway's origin, the review console's too. A script there can
``fetch('/console/…')`` with a signed-in reviewer's or admin's session cookie
and read the CSRF token out of the page it gets: a probe that stood in for a
compromised CDN (ReDoc was loaded as ``latest``, without integrity) minted an
admin key from an admin's open console. So every file is named by its exact
version and carries its Subresource Integrity hash (``integrity=``): the
browser refuses bytes that are not the ones published on npm, whatever the
CDN serves. The hashes are of the files in the packages' npm tarballs (which
jsDelivr and unpkg serve as they are), computed once when a version is
chosen (README, "The API", says how to choose another).
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Request
from litestar.openapi.plugins import (JsonRenderPlugin, OpenAPIRenderPlugin, RapidocRenderPlugin, RedocRenderPlugin,
                                      StoplightRenderPlugin, SwaggerRenderPlugin, YamlRenderPlugin)

REDOC_VERSION = "2.5.1"
SWAGGER_VERSION = "5.18.2"
ELEMENTS_VERSION = "7.7.18"
RAPIDOC_VERSION = "9.3.4"

_JSDELIVR = "https://cdn.jsdelivr.net/npm"
_UNPKG = "https://unpkg.com"
REDOC_JS = f"{_JSDELIVR}/redoc@{REDOC_VERSION}/bundles/redoc.standalone.js"
SWAGGER_JS = f"{_JSDELIVR}/swagger-ui-dist@{SWAGGER_VERSION}/swagger-ui-bundle.js"
SWAGGER_CSS = f"{_JSDELIVR}/swagger-ui-dist@{SWAGGER_VERSION}/swagger-ui.css"
SWAGGER_PRESET_JS = f"{_JSDELIVR}/swagger-ui-dist@{SWAGGER_VERSION}/swagger-ui-standalone-preset.js"
ELEMENTS_JS = f"{_UNPKG}/@stoplight/elements@{ELEMENTS_VERSION}/web-components.min.js"
ELEMENTS_CSS = f"{_UNPKG}/@stoplight/elements@{ELEMENTS_VERSION}/styles.min.css"
RAPIDOC_JS = f"{_UNPKG}/rapidoc@{RAPIDOC_VERSION}/dist/rapidoc-min.js"

#: Each file's SHA-384, of the file in its package's npm tarball (``package/…``).
INTEGRITY: dict[str, str] = {
    REDOC_JS: "sha384-up2uPEo+8XzxuLXKGY4DOk79DbbRclvlcx22QZ60aPWQf8LW69XJ8BWzLFewC05H",
    SWAGGER_JS: "sha384-NXtFPpN61oWCuN4D42K6Zd5Rt2+uxeIT36R7kpXBuY9tLnZorzrJ4ykpqwJfgjpZ",
    SWAGGER_CSS: "sha384-rcbEi6xgdPk0iWkAQzT2F3FeBJXdG+ydrawGlfHAFIZG7wU6aKbQaRewysYpmrlW",
    SWAGGER_PRESET_JS: "sha384-qr68CD0cvHa88PmVu7e1a58Ego4qvKtcvcLdS2a8Mo5zILI01gyIV9jVwJk7X2NU",
    ELEMENTS_JS: "sha384-jwkEvYXoC9AfmUQ2FBNtkXpWwWIM+AhgQf1BIeuk1NUsN0Hb5XsPS4/8cOCIMtYX",
    ELEMENTS_CSS: "sha384-1lLf7J28IOR7k5RlItk6Y+G3hDgVB3y4RCgWNq6ZSwjYfvJXPtZAdW0uklsAZbGW",
    RAPIDOC_JS: "sha384-MDSxszbIJtK/9YakZ3tvi2bK6LaaHnB8+Hd2/fCfih0tLa+Mqlv6HO0bZdrICjjG",
}


class UnpinnedAsset(RuntimeError):
    """A page names a file this module has no hash for (a Litestar that renders other tags)."""


_TAG = re.compile(r"<(?:script|link)\b[^>]*>")
_URL = re.compile(r'\b(?:src|href)="(https://[^"]+)"')
_CROSSORIGIN = re.compile(r'\scrossorigin(?:="[^"]*")?')


def pinned(html: bytes) -> bytes:
    """``html`` with ``integrity`` and ``crossorigin="anonymous"`` on the tag of every pinned file.

    A script or stylesheet from another origin that is not pinned raises: a
    Litestar upgrade that names other files fails the page (and the tests)
    rather than serving a script unchecked. (A favicon's link fetches no
    code and is left as it is.)
    """
    def pin(tag: re.Match[str]) -> str:
        text = tag.group(0)
        url = _URL.search(text)
        if url is None or (text.startswith("<link") and "stylesheet" not in text):
            return text
        digest = INTEGRITY.get(url.group(1))
        if digest is None:
            raise UnpinnedAsset(f"the page loads {url.group(1)} without its hash")
        bare = _CROSSORIGIN.sub("", text[:-1]).rstrip("/ ")
        return f'{bare} integrity="{digest}" crossorigin="anonymous">'

    return _TAG.sub(pin, html.decode()).encode()


class _Pinned:
    """A render plugin whose HTML pages carry their files' hashes (:func:`pinned`)."""

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        return pinned(super().render(request, openapi_schema))  # type: ignore[misc]


class PinnedRedoc(_Pinned, RedocRenderPlugin):
    pass


class PinnedSwagger(_Pinned, SwaggerRenderPlugin):
    pass


class PinnedElements(_Pinned, StoplightRenderPlugin):
    pass


class PinnedRapidoc(_Pinned, RapidocRenderPlugin):
    pass


def render_plugins() -> list[OpenAPIRenderPlugin]:
    """The pages at the paths Litestar's defaults had: ReDoc at ``/schema`` and ``/schema/redoc``, the
    others at their names, the document at ``openapi.json`` / ``.yaml`` / ``.yml``."""
    return [
        PinnedRedoc(path=["/", "/redoc"], js_url=REDOC_JS, google_fonts=False),  # CSS made per browser: no hash
        PinnedSwagger(path="/swagger", js_url=SWAGGER_JS, css_url=SWAGGER_CSS,
                      standalone_preset_js_url=SWAGGER_PRESET_JS),
        PinnedElements(path="/elements", js_url=ELEMENTS_JS, css_url=ELEMENTS_CSS),
        PinnedRapidoc(path="/rapidoc", js_url=RAPIDOC_JS),
        JsonRenderPlugin(path="/openapi.json"),
        YamlRenderPlugin(path=["/openapi.yaml", "/openapi.yml"]),
    ]
