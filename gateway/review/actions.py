"""The bodies of the review actions (flag, comment, disposition), read strictly.

msgspec structs refuse unknown fields (400 ``unsupported_parameter``) and
wrong types or sizes (422 ``invalid_value`` naming the field), as the
completion endpoints do. What they hold goes into the action's entry body,
which is chained and never erased: a note is for the reviewer's judgement,
not for quoting a prompt (read the prompt through the audited story).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from gateway.api_errors import ApiError

MAX_NOTE: int = 4000

Note = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NOTE)]


class Flag(msgspec.Struct, forbid_unknown_fields=True):
    """`POST …/flag`: mark the request for attention, optionally saying why."""

    note: Note | None = None


class Comment(msgspec.Struct, forbid_unknown_fields=True):
    """`POST …/comment`: a reviewer's note."""

    text: Note


class Disposition(msgspec.Struct, forbid_unknown_fields=True):
    """`POST …/disposition`: the reviewer's verdict."""

    disposition: Literal["ok", "violation", "needs-follow-up"]
    note: Note | None = None


BODIES: dict[str, type[msgspec.Struct]] = {"flag": Flag, "comment": Comment, "disposition": Disposition}

_UNKNOWN = re.compile(r"unknown field `(?P<field>[^`]*)`")
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]*)`")


def parse_action(action: str, raw: bytes) -> dict[str, Any]:
    """The action's fields as they go into its entry (absent optional fields left out)."""
    kind = BODIES[action]
    if not raw.strip():
        raw = b"{}"  # a flag needs no body
    try:
        document = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "The request body nests too deep.") from None
    if not isinstance(document, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    try:
        parsed = msgspec.convert(document, kind, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        unknown = _UNKNOWN.search(message)
        if unknown:
            field = unknown.group("field")[:64]
            raise ApiError(400, "unsupported_parameter", f"Unsupported parameter: '{field}' is not accepted here.",
                           param=field) from None
        path = _PATH.search(message)
        missing = _MISSING.search(message)
        param = missing.group("field") if missing else (path.group("path") if path else None)
        raise ApiError(422, "invalid_value", f"Invalid request: {message}", param=param or None) from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "The request body nests too deep.") from None
    fields = {name: value for name, value in msgspec.structs.asdict(parsed).items() if value is not None}
    for name, value in fields.items():
        if isinstance(value, str) and "\x00" in value:  # PostgreSQL cannot read it back out of JSON as text
            raise ApiError(422, "invalid_value", f"'{name}' must not contain a NUL character.", param=name)
    return fields
