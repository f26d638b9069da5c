"""Reading a request body with the size limit, and its coding, answered in OpenAI's error shape.

Litestar raises its own 413 ``HTTPException`` when a body passes
``request_max_body_size`` (GOVGATE_MAX_BODY_BYTES); every endpoint that reads
a body turns it into the same ``body_too_large`` error here, so the message
names the setting wherever the limit is hit.

A body sent with a ``Content-Encoding`` (gzip, br…) is refused before it is
read, with 415 ``unsupported_content_encoding``: the gateway does not
decompress bodies, and reading a gzipped body as JSON answered "not valid
JSON: invalid character (byte 0)", which sends a client looking for a bug in
its JSON (and a ``br``-coded body that happened to be readable bytes was
taken as it stood).

A body framed with a transfer coding besides ``chunked`` (``Transfer-Encoding:
gzip, chunked``) is refused with 501 ``unsupported_transfer_encoding``, as
RFC 9112 (6.1) says of a coding the server does not apply: the parser reads
the chunks, and the gzipped bytes inside them were read as JSON. A body
declared in a character set other than UTF-8 (``Content-Type:
application/json; charset=utf-16``) is refused with 415
``unsupported_media_type``: JSON is UTF-8 (RFC 8259), and such a body was
read as UTF-8 regardless. The media type itself is not checked: ``curl -d``
labels JSON ``application/x-www-form-urlencoded``, and the body decides.

A client that closes its connection before its body's end gets 499
``client_closed`` (nginx's status for it), which it never reads: Litestar
raises a 500 for it, so such requests were counted as server errors
(``govgate_requests_total{status="5xx"}``), an alert on which fired for
clients that gave up.
"""

from __future__ import annotations

from litestar import Request
from litestar.exceptions import HTTPException

from gateway.api_errors import CLIENT_CLOSED_STATUS, ApiError
from gateway.requests.refusals import DO_NOT_RETRY

#: The only content coding a body may have: none.
IDENTITY = "identity"
#: What Litestar's 500 says when the client's ``http.disconnect`` came before the body's end
#: (``litestar.connection.Request.stream``, 2.x).
_DISCONNECTED = "client disconnected prematurely"


async def read_body(request: Request) -> bytes:
    """The whole body; with a content coding: 415 ``unsupported_content_encoding``; over the limit: 413
    ``body_too_large``."""
    coding = _content_coding(request)
    if coding is not None:
        raise ApiError(415, "unsupported_content_encoding",
                       f"The request body is sent with 'Content-Encoding: {coding}'; this gateway reads bodies "
                       "only as they are (no Content-Encoding, or 'identity'). Send the JSON uncompressed.",
                       headers={"Accept-Encoding": IDENTITY})
    transfer = _transfer_coding(request)
    if transfer is not None:
        raise ApiError(501, "unsupported_transfer_encoding",
                       f"The request body is sent with 'Transfer-Encoding: {transfer}'; this gateway reads only "
                       "chunked framing of the body as it is. Send the JSON uncompressed.",
                       headers=DO_NOT_RETRY)  # OpenAI's clients retry a 5xx twice otherwise
    charset = _charset(request)
    if charset is not None:
        raise ApiError(415, "unsupported_media_type",
                       f"The request body is declared in 'charset={charset}'; JSON bodies are read as UTF-8 "
                       "(RFC 8259). Send it in UTF-8, or declare no charset.")
    try:
        return await request.body()
    except HTTPException as exc:
        if exc.status_code == 413:
            raise ApiError(413, "body_too_large", "The request body is larger than this gateway accepts "
                           "(GOVGATE_MAX_BODY_BYTES).") from None
        if exc.status_code == 500 and exc.detail == _DISCONNECTED:
            raise ApiError(CLIENT_CLOSED_STATUS, "client_closed",
                           "The client closed the connection before its request body's end.") from None
        raise


def _content_coding(request: Request) -> str | None:
    """The codings a ``Content-Encoding`` header names other than ``identity`` (shortened), or None."""
    return _codings_besides(request, "content-encoding", IDENTITY)


def _codings_besides(request: Request, header: str, plain: str) -> str | None:
    """The codings the ``header`` lines name (comma-separated) other than ``plain``, joined and shortened, or
    None."""
    named = [coding.strip() for value in request.headers.getall(header, []) for coding in value.split(",")
             if coding.strip() and coding.strip().lower() != plain]
    return ", ".join(named)[:64] if named else None


#: Character sets a body may be declared in: UTF-8, and ASCII, which is part of it.
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


def _transfer_coding(request: Request) -> str | None:
    """The transfer codings a ``Transfer-Encoding`` header names besides ``chunked`` (shortened), or None.

    The parser only lets through framings that end in ``chunked`` (anything
    else it refuses with a 400): what is left is a coding laid under the
    chunks, which it does not undo.
    """
    return _codings_besides(request, "transfer-encoding", "chunked")


def _charset(request: Request) -> str | None:
    """The ``charset`` a ``Content-Type`` declares when it is not UTF-8 (shortened), or None."""
    content_type = request.headers.get("content-type")
    if content_type is None or "charset" not in content_type.lower():
        return None
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').strip()
            return None if charset.lower() in _UTF8_CHARSETS else charset[:64]
    return None
