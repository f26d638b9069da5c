"""HEAD on the health routes, OPTIONS and 405 naming the methods a path really has, and JSON 404s under /schema.

A load balancer probing ``HEAD /healthz`` got 405 (a healthy gateway marked
down); ``OPTIONS /admin/keys`` said ``OPTIONS, POST`` though ``GET`` lists
keys (Litestar keeps a route's first OPTIONS handler when a later
registration adds methods: gateway/allowed_methods.py); an unknown path
under ``/schema`` got Litestar's HTML 404 page instead of OpenAI's JSON
error (gateway/api/schema_site.py).
"""

from __future__ import annotations

import re
import socket

import httpx
import pytest

from gateway import urls
from gateway.api.schema_pages import INTEGRITY, UnpinnedAsset, pinned
from gateway.api.schema_site import SCHEMA_SECURITY_HEADERS
from tests.conftest import serving
from tests.ops.test_served import tiny_only_registry

pytestmark = pytest.mark.anyio

HEALTH_ROUTES = (urls.HEALTH, urls.READY)
#: Unknown paths outside the console: each must answer OpenAI's JSON 404.
UNKNOWN = ("/schema/nope", "/schema/openapi.txt", "/schema/swagger/x", "/schema/redoc/x/y", "/nope", "/v1/nope",
           "/admin/nope", "/healthz/x", "/v1/audit/nope")


def _read_head(conn: socket.socket) -> bytes:
    """An answer's status line and headers, read off ``conn`` (b"" if the server closed it first)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            return head
        head += chunk
    return head


def concrete(path: str) -> str:
    """A path template of the document with its parameters filled in."""
    return re.sub(r"\{[^}]+\}", "x1", path)


def assert_json_404(response) -> None:
    assert response.status_code == 404, (response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    assert response.json()["error"]["code"] == "not_found" and response.json()["error"]["type"] == "not_found_error"
    assert response.headers.get(urls.REQUEST_ID_HEADER)


async def test_options_and_405_name_every_method_a_documented_path_has(client) -> None:
    document = (await client.get("/schema/openapi.json")).json()
    assert urls.ADMIN_KEYS in document["paths"]
    for path, operations in document["paths"].items():
        documented = {method.upper() for method in operations if method in {"get", "post", "put", "delete", "patch"}}
        expected = documented | {"OPTIONS"} | ({"HEAD"} if "GET" in documented else set())
        answer = await client.options(concrete(path))
        assert answer.status_code == 204, (path, answer.text)
        assert answer.content == b""
        assert answer.headers["allow"] == ", ".join(sorted(expected)), (path, answer.headers)
        assert answer.headers.get(urls.REQUEST_ID_HEADER)
        refused = await client.request("PATCH" if "PATCH" not in expected else "DELETE", concrete(path))
        assert refused.status_code == 405, (path, refused.text)
        assert refused.json()["error"]["code"] == "method_not_allowed"
        assert refused.headers["allow"] == answer.headers["allow"], path


async def test_options_on_an_unknown_path_is_the_json_404(client) -> None:
    assert_json_404(await client.options("/nope"))


async def test_head_on_the_health_routes_answers_get_s_status_without_a_body(client) -> None:
    for path in HEALTH_ROUTES:
        got, headed = await client.get(path), await client.head(path)
        assert headed.status_code == got.status_code, (path, got.text)
        assert headed.content == b""
        assert headed.headers["content-type"] == "application/json"
        assert headed.headers.get(urls.REQUEST_ID_HEADER)


async def test_head_on_every_get_route_answers_get_s_status_and_headers_without_a_body(client) -> None:
    # HEAD on a GET-only path was a 405 while GET answered (only the health routes had HEAD handlers); now the
    # path is asked with GET and answered without its body (gateway/allowed_methods.py).
    document = (await client.get("/schema/openapi.json")).json()
    paths = [concrete(path) for path, operations in document["paths"].items() if "get" in operations]
    paths += ["/console/", "/console/sign-in", "/console/search", "/console/nope", "/console/keys", "/schema",
              "/nope"]
    for path in paths:
        got, headed = await client.get(path), await client.head(path)
        assert headed.status_code == got.status_code, (path, headed.status_code, got.status_code)
        assert headed.status_code != 405, path
        assert headed.content == b"", path
        assert headed.headers.get("content-type") == got.headers.get("content-type"), path
        assert headed.headers.get("location") == got.headers.get("location"), path
        assert headed.headers.get(urls.REQUEST_ID_HEADER)
    refused = await client.head("/v1/chat/completions")  # a path without GET still refuses HEAD
    assert refused.status_code == 405 and refused.headers["allow"] == "OPTIONS, POST"


async def test_unknown_paths_outside_the_console_are_json_404s_and_the_schema_pages_are_served(client) -> None:
    for path in UNKNOWN:
        assert_json_404(await client.get(path))
    document = await client.get("/schema/openapi.json")
    assert document.status_code == 200 and document.json()["info"]["title"] == "govgate"
    for page in ("/schema", "/schema/redoc", "/schema/swagger"):
        shown = await client.get(page)
        assert shown.status_code == 200 and shown.headers["content-type"].startswith("text/html"), page
    console = await client.get("/console/nope")  # the console keeps its own pages
    assert console.status_code == 404 and console.headers["content-type"].startswith("text/html")


async def test_every_schema_page_loads_only_files_pinned_by_their_hashes(client) -> None:
    # ReDoc was loaded as "latest" and no page had integrity hashes: a compromised CDN's script ran on the
    # console's origin and used a signed-in admin's session (a probe minted an admin key that way)
    for page in ("/schema", "/schema/redoc", "/schema/swagger", "/schema/elements", "/schema/rapidoc",
                 "/schema/openapi.yaml", "/schema/openapi.yml"):
        shown = await client.get(page)
        assert shown.status_code == 200, page
        external = re.findall(r'<(?:script|link)\b[^>]*\b(?:src|href)="(https://[^"]+)"[^>]*>', shown.text)
        tags = re.findall(r'<(?:script|link)\b[^>]*\b(?:src|href)="https://[^"]+"[^>]*>', shown.text)
        for url, tag in zip(external, tags):
            if tag.startswith("<link") and 'rel="stylesheet"' not in tag and "stylesheet" not in tag:
                continue  # a favicon: no script, nothing to pin
            assert f'integrity="{INTEGRITY[url]}"' in tag and 'crossorigin="anonymous"' in tag, (page, tag)
    assert "latest" not in "".join(INTEGRITY)
    with pytest.raises(UnpinnedAsset):  # a page naming a CDN file without its hash is refused, not served
        pinned(b'<script src="https://cdn.jsdelivr.net/npm/redoc@9/x.js" crossorigin></script>')


async def test_the_schema_pages_cannot_be_framed_or_sniffed(client) -> None:
    """They share the console's origin (probe s56 F3: no header said so before)."""
    for page in ("/schema", "/schema/redoc", "/schema/swagger", "/schema/elements", "/schema/rapidoc",
                 "/schema/openapi.json", "/schema/openapi.yaml", "/schema/nope"):
        shown = await client.get(page)
        assert shown.status_code == (404 if page.endswith("nope") else 200), page
        assert {name: shown.headers.get(name) for name in SCHEMA_SECURITY_HEADERS} == SCHEMA_SECURITY_HEADERS, page
        assert "frame-ancestors 'none'" in shown.headers["content-security-policy"]


def test_a_served_gateway_answers_head_probes_and_json_404s(settings, worker, tmp_path) -> None:
    """Through uvicorn, as a load balancer sees it (ready: the suite's worker serves the registry's one model)."""
    model_path = settings.var_dir / "models" / "govgate-tiny-llama.gguf"
    own = settings.with_(models_file=str(tiny_only_registry(tmp_path, model_path)))
    with serving(own, tmp_path / "serve.log") as base:
        for path in HEALTH_ROUTES:
            headed = httpx.head(base + path, timeout=30)
            assert headed.status_code == 200, (path, headed.status_code)
            assert headed.content == b""
        assert httpx.options(base + urls.ADMIN_KEYS, timeout=30).headers["allow"] == "GET, HEAD, OPTIONS, POST"
        # a GET page answers HEAD through uvicorn too: GET's status and length, no body
        page = base + "/console/sign-in"
        got, headed = httpx.get(page, timeout=30), httpx.head(page, timeout=30)
        assert (headed.status_code, headed.content) == (200, b"") and got.status_code == 200
        assert headed.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
        # ... and keeps the connection: a HEAD of a GET-only page, an error's HEAD (401), then a GET on the same
        # one (the HEAD was answered with the GET's method in the server's own scope: uvicorn then expected
        # the GET's body, logged an error with a traceback and closed the connection)
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            for request, status in ((b"HEAD /console/sign-in", 200), (b"HEAD /v1/models", 401),
                                    (b"GET /healthz", 200)):
                conn.sendall(request + b" HTTP/1.1\r\nHost: gateway\r\n\r\n")
                head = _read_head(conn)
                assert head.startswith(b"HTTP/1.1 %d " % status), (request, head)
        assert "Exception in ASGI application" not in (tmp_path / "serve.log").read_text()
        schema = httpx.get(base + "/schema", timeout=30)
        assert schema.status_code == 200 and schema.headers["content-type"].startswith("text/html")
        for path in UNKNOWN:
            assert_json_404(httpx.get(base + path, timeout=30))
