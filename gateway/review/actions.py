"""The bodies of the review actions (flag, comment, disposition), read strictly.

msgspec structs refuse unknown fields (400 ``unsupported_parameter``) and
wrong types or sizes (422 ``invalid_value`` naming the field), as the
completion endpoints do. What they hold goes into the action's entry body,
which is chained and never erased: a note is for the reviewer's judgement,
not for quoting a prompt (read the prompt through the audited story).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from gateway.api_errors import ApiError
from gateway.requests.parsing import decode_struct

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


def parse_action(action: str, raw: bytes) -> dict[str, Any]:
    """The action's fields as they go into its entry (absent optional fields left out)."""
    kind = BODIES[action]
    if not raw.strip():
        raw = b"{}"  # a flag needs no body
    parsed = decode_struct(raw, kind)
    fields = {name: value for name, value in msgspec.structs.asdict(parsed).items() if value is not None}
    for name, value in fields.items():
        if isinstance(value, str) and "\x00" in value:  # PostgreSQL cannot read it back out of JSON as text
            raise ApiError(422, "invalid_value", f"'{name}' must not contain a NUL character.", param=name)
        if isinstance(value, str) and not value.strip():  # an empty one is refused: so is one of spaces only
            raise ApiError(422, "invalid_value", f"'{name}' is blank; write something or leave it out.",
                           param=name)
    return fields
