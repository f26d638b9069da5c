"""``metadata`` has OpenAI's bounds and a declared purpose is a label, through the real app.

The purpose (``X-Govgate-Purpose`` or ``metadata.purpose``) goes into the
policy input and the request entry in clear at every ``prompt_logging``
level, where the content rules never look: unbounded, any text could be
stored that way. Each bound is served at the limit and refused one past it
(422 ``invalid_value`` in OpenAI's shape, ``param`` named, a ``rejected``
entry), lengths in characters, not bytes; a refused purpose's text is in
neither the entry nor the logs.
"""

from __future__ import annotations

import json
import logging
import subprocess
from typing import Any, AsyncIterator

import pytest
from litestar.testing import AsyncTestClient

from gateway import urls
from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import bearer
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio

HEADER = urls.PURPOSE_HEADER
#: What a refused purpose may hold: text the client wants kept (found by the tests below if it were).
SECRET = "ZQX card 4111 1111 1111 1111"


@pytest.fixture(scope="module")
async def client(settings: Settings, worker: subprocess.Popen) -> AsyncIterator[AsyncTestClient]:
    """The module's one app (its tests share nothing through its state), writing an access-log line per
    request: the tests see what the logs hold of a refused purpose (nothing) in a log that says something."""
    async with AsyncTestClient(create_app(settings.with_(access_log=True)), timeout=120) as test_client:
        yield test_client


async def _post(client, keyring, *, metadata: dict[str, Any] | None = None,
                headers: list[tuple[str, str | bytes]] = ()) -> Any:
    body: dict[str, Any] = {"model": TINY_MODEL_NAME, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    if metadata is not None:
        body["metadata"] = metadata
    return await client.post(urls.CHAT_COMPLETIONS, content=json.dumps(body).encode(),
                             headers=[*bearer(keyring["analyst"]).items(), ("Content-Type", "application/json"),
                                      *headers])


def _entries(audit_store, response) -> list[Any]:
    return audit_store.entries_for(response.headers[urls.REQUEST_ID_HEADER])


def _served(audit_store, response) -> dict[str, Any]:
    """The request entry of a served request (asserting it was served)."""
    assert response.status_code == 200, response.text
    entries = _entries(audit_store, response)
    assert [e.kind for e in entries] == ["request", "completion"]
    return entries[0].body


def _refused(audit_store, response, param: str, kept_param: str | None = None) -> dict[str, Any]:
    """The ``rejected`` entry of a refused request, after checking the answer (OpenAI's shape)."""
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value", param)
    assert error["message"]
    entries = _entries(audit_store, response)
    assert [e.kind for e in entries] == ["rejected"] and entries[0].principal == "alice"
    recorded = entries[0].body
    assert recorded["status"] == 422
    assert (recorded["error"]["code"], recorded["error"]["param"]) == ("invalid_value", kept_param or param)
    return recorded


# -- metadata: OpenAI's bounds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata", [
    {f"k{i}": "v" for i in range(16)},
    {"k" * 64: "v"},
    {"é" * 64: "v"},  # 128 bytes of UTF-8: characters count
    {"note": "x" * 512},
    {"note": "€" * 512},  # 1536 bytes
], ids=["16-pairs", "key-64", "key-64-unicode", "value-512", "value-512-unicode"])
async def test_metadata_at_its_bounds_is_served(client, keyring, audit_store, metadata):
    _served(audit_store, await _post(client, keyring, metadata=metadata))


@pytest.mark.parametrize("metadata,param,kept", [
    ({f"k{i}": "v" for i in range(17)}, "metadata", "metadata"),
    ({"k" * 65: "v"}, "metadata", "metadata"),
    ({"é" * 65: "v"}, "metadata", "metadata"),
    ({"note": "x" * 513}, "metadata.note", "metadata.…"),  # a key the client made up is its text
    ({"note": "€" * 513}, "metadata.note", "metadata.…"),
], ids=["17-pairs", "key-65", "key-65-unicode", "value-513", "value-513-unicode"])
async def test_metadata_past_its_bounds_is_422_and_audited(client, keyring, audit_store, metadata, param, kept):
    response = await _post(client, keyring, metadata=metadata)
    _refused(audit_store, response, param, kept)


async def test_a_refused_metadata_key_is_not_kept(client, keyring, audit_store):
    response = await _post(client, keyring, metadata={SECRET + "x" * 64: "v", "note": "y" * 513})
    recorded = _refused(audit_store, response, "metadata")
    assert "ZQX" not in json.dumps(recorded) and "ZQX" not in response.text


# -- the purpose: a label, from either place ------------------------------------------------------------------------

AT_THE_LIMIT = ["p" * 64, "é" * 64, "目的" * 32, "incident review"]


@pytest.mark.parametrize("purpose", AT_THE_LIMIT, ids=["ascii-64", "latin-64", "cjk-64", "inner-space"])
@pytest.mark.parametrize("where", ["header", "metadata", "both"])
async def test_a_purpose_at_the_limit_is_served_and_recorded(client, keyring, audit_store, purpose, where):
    headers = [(HEADER, purpose.encode())] if where != "metadata" else []
    metadata = {"purpose": purpose} if where != "header" else None
    recorded = _served(audit_store, await _post(client, keyring, metadata=metadata, headers=headers))
    assert recorded["purpose"] == purpose
    assert recorded["policy_input"]["request"]["purpose"] == purpose


#: (id, purpose) each refused from either place, with SECRET in it where it fits.
NOT_LABELS = [
    ("65", "p" * 65),
    ("65-unicode", "é" * 65),
    ("long-text", SECRET + " please keep this: " * 20),
    ("empty", ""),
    ("spaces", "   "),
    ("leading-space", " " + SECRET),
    ("trailing-space", SECRET + " "),
    ("nul", SECRET + "\x00"),
    ("tab", "a\tb" + SECRET),
    ("newline", SECRET + "\nmore"),
    ("del", SECRET + "\x7f"),
    ("c1-nel", SECRET + "\x85"),
    ("line-separator", SECRET + "\u2028"),
    ("paragraph-separator", SECRET + "\u2029"),
    ("zero-width", "re\u200bsearch"),
    ("bidi-override", "\u202e" + SECRET),
]
#: Those an HTTP header can carry as the client wrote them (its bytes as UTF-8; HTTP strips surrounding
#: spaces, and a C0 control or DEL is no header byte at all: the ASGI server refuses the request).
HEADER_CASES = {"65", "65-unicode", "long-text", "empty", "c1-nel", "line-separator", "paragraph-separator",
                "zero-width", "bidi-override"}


@pytest.mark.parametrize("purpose", [case[1] for case in NOT_LABELS], ids=[case[0] for case in NOT_LABELS])
async def test_metadata_purpose_that_is_not_a_label_is_422_and_not_kept(client, keyring, audit_store, caplog,
                                                                        purpose):
    with caplog.at_level(logging.DEBUG):
        response = await _post(client, keyring, metadata={"purpose": purpose})
    recorded = _refused(audit_store, response, "metadata.purpose")
    _nothing_kept(recorded, response, caplog, purpose)


@pytest.mark.parametrize("purpose", [case[1] for case in NOT_LABELS if case[0] in HEADER_CASES],
                         ids=[case[0] for case in NOT_LABELS if case[0] in HEADER_CASES])
async def test_a_header_purpose_that_is_not_a_label_is_422_and_not_kept(client, keyring, audit_store, caplog,
                                                                        purpose):
    with caplog.at_level(logging.DEBUG):
        response = await _post(client, keyring, headers=[(HEADER, purpose.encode())])
    recorded = _refused(audit_store, response, HEADER)
    _nothing_kept(recorded, response, caplog, purpose)


def _nothing_kept(recorded: dict[str, Any], response, caplog, purpose: str) -> None:
    """Nothing of ``purpose`` in the rejected entry, the answer's message or the logs (which did log the request)."""
    access = [r for r in caplog.records if r.name == "govgate.access"]
    assert [(r.status, r.code) for r in access] == [(422, "invalid_value")]  # the logs were captured
    marker = "ZQX" if "ZQX" in purpose else purpose.strip() or None
    if marker:
        assert marker not in json.dumps(recorded, ensure_ascii=False)
        assert marker not in response.json()["error"]["message"]
        assert marker not in caplog.text
    assert "purpose" not in recorded  # a rejected entry has no purpose field: the request was never decided


async def test_a_utf8_header_is_read_as_utf8(client, keyring, audit_store):
    """ASGI passes header bytes that Litestar decodes as Latin-1: ``évaluation`` was ``Ã©valuation``."""
    response = await _post(client, keyring, headers=[(HEADER, "évaluation".encode())],
                           metadata={"purpose": "évaluation"})
    assert _served(audit_store, response)["purpose"] == "évaluation"


async def test_a_header_and_metadata_purpose_that_differ_are_422(client, keyring, audit_store):
    """Which one counts would be a guess (the header used to win silently)."""
    response = await _post(client, keyring, headers=[(HEADER, "research")], metadata={"purpose": "support"})
    recorded = _refused(audit_store, response, "metadata.purpose")
    assert HEADER in response.json()["error"]["message"]
    assert "support" not in json.dumps(recorded) and "research" not in json.dumps(recorded)
