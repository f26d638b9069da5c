"""The declared purpose: a label the policy matches against its lists, so it is bounded like one.

A request declares a purpose with the ``X-Govgate-Purpose`` header or
``metadata.purpose``. The purpose goes into the policy input and, as sent,
into the request's audit entry at every ``prompt_logging`` level, and
``policies/purpose.rego`` quotes a refused one in its reason: the content
rules never read it. Unbounded, it was a way to have any text (a prompt, a
card number in a pasted paragraph) stored in clear beside the logging
obligation. A label needs little: at most :data:`MAX_PURPOSE_CHARS`
printable characters (``str.isprintable``: no control character, C0, DEL
or C1, no format character such as a zero-width or bidi mark, no line or
paragraph separator, no space but the ASCII one), not empty, no leading or
trailing space. Anything else is refused, not mended: the policy matches
the label exactly, so a purpose stripped or cleaned by the gateway would be
one the client did not declare.

The header's value is read as UTF-8 (the policy's lists are JSON text);
HTTP carries it as bytes and ASGI hands it over as Latin-1, which would
turn ``évaluation`` into ``Ã©valuation``. Its surrounding spaces and tabs
are HTTP's, not the client's (RFC 9110 excludes them from a field's value):
dropped. Given twice, or in both places with different values, which one
counts would be a guess: refused.

Every refusal is 422 ``invalid_value`` (as any out-of-range value) naming the header or
``metadata.purpose`` and never quotes the value, so the ``rejected`` entry
(which keeps the message) holds nothing of it.
"""

from __future__ import annotations

from typing import Sequence

from gateway.api_errors import ApiError
from gateway.urls import PURPOSE_HEADER

#: Longest declared purpose, in characters (code points, not bytes).
MAX_PURPOSE_CHARS = 64
#: ``param`` of a refused ``metadata.purpose`` (the audit entry keeps it as such: ``logged_param``).
METADATA_PURPOSE = "metadata.purpose"


def declared_purpose(header_values: Sequence[str], metadata: dict[str, str] | None) -> str | None:
    """The purpose the request declares (None: none), or :class:`ApiError` 422 if it is not a label.

    ``header_values``: every ``X-Govgate-Purpose`` value as the ASGI server
    passed it (Latin-1 decoded bytes).
    """
    if len(header_values) > 1:
        raise _refused(PURPOSE_HEADER, f"'{PURPOSE_HEADER}' is given {len(header_values)} times; "
                                       "declare one purpose.")
    # Surrounding spaces and tabs are no part of a field's value (RFC 9110, 5.5), but httptools, uvicorn's
    # parser, passes trailing ones on.
    from_header = _label(_utf8(header_values[0]).strip(" \t"), PURPOSE_HEADER) if header_values else None
    in_metadata = (metadata or {}).get("purpose")
    from_metadata = None if in_metadata is None else _label(in_metadata, METADATA_PURPOSE)
    if from_header is not None and from_metadata is not None and from_header != from_metadata:
        raise _refused(METADATA_PURPOSE, f"'{METADATA_PURPOSE}' differs from the '{PURPOSE_HEADER}' header; "
                                         "declare one purpose (in either, or the same in both).")
    return from_header if from_header is not None else from_metadata


def _utf8(value: str) -> str:
    """The header's value read as UTF-8 (ASGI's servers pass its bytes, Litestar decodes them as Latin-1)."""
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:  # not as an ASGI server passes it: text already
        return value
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _refused(PURPOSE_HEADER, f"'{PURPOSE_HEADER}' is not UTF-8 text.") from None


def _label(value: str, param: str) -> str:
    """``value`` if it is a purpose label, else the refusal naming ``param`` (the value itself unquoted)."""
    if not value.strip():
        raise _refused(param, f"'{param}' is empty or blank; declare a purpose or leave it out.")
    if len(value) > MAX_PURPOSE_CHARS:
        raise _refused(param, f"'{param}' has {len(value)} characters; a purpose has at most {MAX_PURPOSE_CHARS}.")
    if not value.isprintable():
        raise _refused(param, f"'{param}' holds a control, format or separator character; a purpose is "
                              "printable text on one line.")
    if value != value.strip():
        raise _refused(param, f"'{param}' begins or ends with a space.")
    return value


def _refused(param: str, message: str) -> ApiError:
    return ApiError(422, "invalid_value", message, param=param)
