"""An HTTP/1.0 client's answer without a length, delimited by closing the connection, not chunked.

uvicorn's httptools protocol frames any answer that names no
``content-length`` (a stream: Server-Sent Events) with
``transfer-encoding: chunked``, whatever the request's HTTP version; RFC
9112 (6.1) forbids that to an HTTP/1.0 client, which does not know it and
reads the chunk sizes as part of the stream (``ee\\r\\ndata: {…``). uvicorn's
h11 protocol, used before, did what HTTP/1.0 expects: send the body as it
is and close the connection at its end. This does the same for the cycle of
an HTTP/1.0 request, by wrapping its ``send``: no chunked framing, the
connection marked ``close`` and closed after the last piece (uvicorn's own
end-of-response handling, which checks each piece against an expected
length: each piece is declared as it is sent).
"""

from __future__ import annotations

from typing import Any

#: Answers that have no body whatever their headers say (uvicorn does not frame them either).
_BODILESS = (204, 304)


def unframed_for_http10(cycle: Any) -> None:
    """Make ``cycle`` (uvicorn's RequestResponseCycle of an HTTP/1.0 request) send a length-less body raw."""
    send = cycle.send
    unframed = False

    async def send_unframed(message: Any) -> None:
        nonlocal unframed
        if message["type"] == "http.response.start" and not cycle.response_started:
            names = {bytes(name).lower() for name, _ in message.get("headers", [])}
            if (b"content-length" not in names and b"transfer-encoding" not in names
                    and cycle.scope["method"] != "HEAD" and message["status"] not in _BODILESS):
                unframed = True
                cycle.chunked_encoding = False  # decided: uvicorn then adds no transfer-encoding
                cycle.keep_alive = False  # the end of the body is the end of the connection
                cycle.expected_content_length = 0
        elif unframed and message["type"] == "http.response.body":
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    cycle.send = send_unframed
