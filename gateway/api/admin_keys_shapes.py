"""The key administration API's bodies and answers, as msgspec structs (read strictly, described as they are).

Request bodies refuse unknown fields (400 ``unsupported_parameter``) and
wrong types, sizes or characters (422 ``invalid_value`` naming the field),
as the completion and review bodies do; a name's pattern is the key store's
own (``gateway/auth/keys.py``), so a NUL, a space or an overlong name never
reaches it. Answers are built from the stored row by :func:`key_document`
and described by the closed structs below. Class docstrings become the
schemas' descriptions, so they are Markdown.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

from gateway.api_errors import ApiError
from gateway.auth import ApiKey
from gateway.keys_admin.service import MAX_NAME, MAX_NOTE, MAX_ROLES
from gateway.requests.parsing import decode_struct

#: The key store's name rule (``validate_name``), as a JSON Schema pattern.
NAME_PATTERN = f"^[A-Za-z0-9][A-Za-z0-9._@-]{{0,{MAX_NAME - 1}}}$"
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN)]
Roles = Annotated[list[Name], msgspec.Meta(min_length=1, max_length=MAX_ROLES,
                                           description="Roles the policy knows (policies/data.json "
                                                       "`govgate_config.roles`); an unknown one is refused with "
                                                       "422 `unknown_role`.")]
Note = Annotated[str, msgspec.Meta(max_length=MAX_NOTE, pattern="^[^\\x00]*$",
                                   description="Free text for admins (it goes into the audit entry: no secrets).")]


class _Strict(msgspec.Struct, forbid_unknown_fields=True):
    """A body with exactly these fields."""


class CreateKey(_Strict):
    """`POST /admin/keys`: a new key for `user` (LiteLLM's `/key/generate` names it `user_id`)."""

    user: Name
    roles: Roles
    team: Name | None = None
    note: Note | None = None


class SetRoles(_Strict):
    """`PUT /admin/keys/{key_id}/roles`: the key's roles from now on (replacing all its old ones)."""

    roles: Roles


class KeyDocument(_Strict):
    """An API key as stored: never its secret (only its hash is kept), which was shown once at creation."""

    object: Literal["api_key"]
    key_id: str
    user: str
    team: str | None
    roles: list[str]
    note: str | None
    created_at: str
    revoked_at: str | None


class CreatedKey(KeyDocument):
    """The new key: `key` is the secret to send as `Authorization: Bearer …`, shown this once and never again."""

    key: str


class ChangedKey(KeyDocument):
    """The key after a revocation or roles change. `changed` is false when it already was so (nothing was
    written); `gateways_told` is false when the change could not be signalled to the other gateways, and
    `warning` then says how long one may lag."""

    changed: bool
    gateways_told: bool
    warning: str | None


class KeyList(_Strict):
    """`GET /admin/keys`: one page, oldest first; `next_cursor` is the next page's `cursor`."""

    object: Literal["list"]
    data: list[KeyDocument]
    has_more: bool
    next_cursor: str | None


def key_document(row: ApiKey) -> dict[str, Any]:
    return {"object": "api_key", "key_id": row.key_id, "user": row.user, "team": row.team, "roles": row.roles,
            "note": row.note, "created_at": row.created_at, "revoked_at": row.revoked_at}


B = TypeVar("B", CreateKey, SetRoles)


def parse(raw: bytes, kind: type[B]) -> B:
    """``raw`` read as ``kind``, or the designed 400/422."""
    if not raw.strip():
        raise ApiError(400, "invalid_json", "The request body is empty; send a JSON object.")
    return decode_struct(raw, kind)
