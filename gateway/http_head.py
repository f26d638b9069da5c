"""uvicorn's httptools protocol with a bound on a request's head, the bound its h11 protocol has.

httptools (llhttp) reads a request line and headers of any length: a client
that never ends its headers had the gateway hold everything it sent (a
16 MB header was read whole and answered 200, the API's memory 16 MB
larger). uvicorn's h11 protocol refuses a head larger than
``h11_max_incomplete_event_size`` (h11's 16 KiB by default), and this
protocol applies the same bound, read from the same uvicorn setting: a head
that is complete is measured exactly when its last header is read; one
that is still arriving is cut off after the read that takes it past the
bound, so no more than the bound and one read (uvloop reads up to 256 KiB)
is ever held. The client gets ``431 Request Header Fields Too Large`` in
OpenAI's error shape and the connection is closed; the app never sees the
request. An HTTP/1.0 request's length-less answer (a stream) is sent unchunked
and ended by closing the connection (:mod:`gateway.http10_framing`).
Everything else is uvicorn's own protocol.
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.api_errors import ApiError, new_request_id
from gateway.http10_framing import unframed_for_http10
from gateway.urls import CONNECTION_CLOSING, OPENAI_REQUEST_ID_HEADER, REQUEST_ID_EXTENSION, REQUEST_ID_HEADER

#: Largest request head (request line and headers) the gateway reads: h11's own default.
MAX_HEAD_BYTES = 16 * 1024
#: Bytes a head holds besides its URL and header names and values: "METHOD ", " HTTP/1.1\r\n", the blank line.
_LINE_BYTES = 24
#: Per header, besides its name and value: ": " and "\r\n".
_HEADER_BYTES = 4


class HeadTooLarge(Exception):
    """Raised in the parser's callback when a complete head is over the bound (the parse stops there)."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing request heads larger than ``h11_max_incomplete_event_size``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_limit = self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES
        #: Bytes read since the current head began (whole reads: a read that ends a head counts whole).
        self._head_read = 0
        self._in_head = True
        self._head_refused = False
        #: The id given to the request whose head was read and whose body has not ended (None between two).
        self._request_id: str | None = None

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_read += len(data)
        super().data_received(data)
        if self._in_head and self._head_read > self._head_limit and not self.transport.is_closing():
            self._refuse_head()

    def on_headers_complete(self) -> None:
        size = _LINE_BYTES + len(self.url) + sum(len(name) + len(value) + _HEADER_BYTES for name, value in self.headers)
        if size > self._head_limit:
            self._head_refused = True
            raise HeadTooLarge(size)  # the parser stops; uvicorn answers through send_400_response (below)
        self._in_head, self._head_read = False, 0
        super().on_headers_complete()
        extensions = self.scope.setdefault("extensions", {})
        # The app asks it before it answers: a connection closed meanwhile drops the answer unseen, and the
        # audit must not say the client received it (gateway/api/completions.py, probe s54 A2).
        extensions[CONNECTION_CLOSING] = self.transport.is_closing
        # The request's id, given here rather than in the app, so that a 400 for a body whose framing breaks
        # (send_400_response) names the id the app's ``rejected`` entry has (probe s54); the ASGI task that
        # reads it was created by super() and has not run yet.
        self._request_id = extensions[REQUEST_ID_EXTENSION] = new_request_id()
        if self.parser.get_http_version() == "1.0":  # no chunked framing for it (gateway/http10_framing.py)
            unframed_for_http10(self.cycle)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_read, self._request_id = True, 0, None

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, in OpenAI's error shape (uvicorn's own is text/plain);
        a head refused for its size gets the 431 instead."""
        if self._head_refused:
            self._refuse_head()
        else:
            error = ApiError(400, "invalid_request", f"The request is not valid HTTP/1.1 ({msg.rstrip('.')}).")
            self._send_error(b"HTTP/1.1 400 Bad Request\r\n", error)

    def _refuse_head(self) -> None:
        self._head_refused = True
        message = f"the request's line and headers are larger than {self._head_limit} bytes"
        self.logger.warning("request head over %d bytes refused", self._head_limit)
        self._send_error(b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
                         ApiError(431, "request_header_fields_too_large", message))

    def _send_error(self, status_line: bytes, error: ApiError) -> None:
        """``error`` as the connection's last response (JSON, OpenAI's shape), then the connection closed."""
        body = json.dumps(error.body()).encode()
        # every answer names one: a body cut short by broken framing, its request's (its entry's); else a new one
        request_id = (self._request_id or new_request_id()).encode()
        self.transport.write(b"".join([
            status_line,
            *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
            REQUEST_ID_HEADER.lower().encode() + b": " + request_id + b"\r\n",
            OPENAI_REQUEST_ID_HEADER.encode() + b": " + request_id + b"\r\n",
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]))
        self.transport.close()
