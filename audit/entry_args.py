"""An entry's arguments checked and its body and payload serialised, as every appender does it.

Apart from :mod:`audit.store` so that a process appending without SQLAlchemy
(:mod:`audit.driver_store`, the workers) checks and serialises exactly as the
store does: one rule for what may go on the chain, whichever way it is written.
"""

from __future__ import annotations

import json
import secrets
from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Final, Mapping

import msgspec

from .chain import FORMAT_2, canonical_text, payload_digest
from .entry import AuditEntry
from .errors import InvalidEntryError
from .kinds import CHAIN_FORMAT, KINDS, TERMINAL_KINDS

if TYPE_CHECKING:
    from .appender import Chained

#: Length limit for ids and names; checked here so overlong values give a clear error on every
#: backend rather than a PostgreSQL truncation error (the columns are ``String(NAME_LEN)``).
NAME_LEN = 255


@dataclass(frozen=True, slots=True)
class PreparedEntry:
    """One append's arguments checked and serialised: what the appender binds, and the entry it returns."""

    fields: dict[str, Any]
    body_text: str
    stored_body: dict[str, Any]
    payload_text: str | None
    stored_payload: dict[str, Any] | None
    digest: str | None

    @property
    def terminal_request_id(self) -> str | None:
        return self.fields["terminal_request_id"]

    def entry(self, chained: Chained) -> AuditEntry:
        """The entry as stored, once the append has chained it."""
        return AuditEntry(seq=chained.seq, created_at=chained.created_at, body=self.stored_body,
                          prev_hash=chained.prev_hash, hash=chained.hash, payload=self.stored_payload,
                          payload_digest=self.digest, format=FORMAT_2, **self.fields)


@dataclass(frozen=True, slots=True)
class AppendArgs:
    """One append's arguments as :meth:`audit.store.AuditStore.append` takes them (no ``alongside``), for
    :meth:`audit.store.AuditStore.append_many`."""

    kind: str
    request_id: str
    principal: str | None
    team: str | None
    model: str | None
    body: Mapping[str, Any]
    policy_revision: str | None
    payload: Mapping[str, Any] | None = None

    def prepared(self) -> PreparedEntry:
        return prepared_entry(self.kind, self.request_id, principal=self.principal, team=self.team,
                              model=self.model, body=self.body, policy_revision=self.policy_revision,
                              payload=self.payload)


def prepared_entry(kind: str, request_id: str, *, principal: str | None, team: str | None, model: str | None,
                   body: Mapping[str, Any], policy_revision: str | None,
                   payload: Mapping[str, Any] | None) -> PreparedEntry:
    """Check an append's arguments (:class:`InvalidEntryError`) and serialise its body and payload once."""
    check_args(kind, request_id, principal=principal, team=team, model=model, policy_revision=policy_revision)
    if kind == CHAIN_FORMAT:
        raise InvalidEntryError("chain_format entries are written by the store itself")
    body_text, stored_body = normalise_body(body)
    payload_text, stored_payload, digest = normalise_payload(payload)
    fields: dict[str, Any] = {
        "request_id": request_id,
        "kind": kind,
        "principal": principal,
        "team": team,
        "model": model,
        "policy_revision": policy_revision,
        "terminal_request_id": request_id if kind in TERMINAL_KINDS else None,
    }
    return PreparedEntry(fields, body_text, stored_body, payload_text, stored_payload, digest)


def check_args(kind: str, request_id: str, **optional: str | None) -> None:
    """Refuse what the schema would refuse, with a message naming the argument.

    A NUL character is refused on both databases: PostgreSQL's text cannot
    hold one while SQLite stores it, and a trail must not accept on one
    backend an entry it could not hold on the other (nor could it be copied
    across). Bodies and payloads may hold NUL: JSON escapes it.
    """
    if kind not in KINDS:
        raise InvalidEntryError(f"unknown audit kind {kind!r}; expected one of {sorted(KINDS)}")
    if not isinstance(request_id, str) or not request_id or len(request_id) > NAME_LEN:
        raise InvalidEntryError(f"request_id must be a non-empty string of at most {NAME_LEN} characters")
    if "\x00" in request_id:
        raise InvalidEntryError("request_id must not contain a NUL character")
    for name, value in optional.items():
        if value is not None and (not isinstance(value, str) or len(value) > NAME_LEN):
            raise InvalidEntryError(f"{name} must be None or a string of at most {NAME_LEN} characters")
        if value is not None and "\x00" in value:
            raise InvalidEntryError(f"{name} must not contain a NUL character")


def normalise_payload(payload: Mapping[str, Any] | None) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """The payload's stored text (salted canonical JSON), its round-trip and its digest; all None without one.

    The salt (128 random bits) keeps the digest of a short prompt from being
    confirmed by hashing guesses: the digest stays on the chain forever, the
    payload may not.
    """
    if payload is None:
        return None, None, None
    if type(payload) is not dict and not isinstance(payload, Mapping):
        raise InvalidEntryError(f"payload must be a mapping or None, not {type(payload).__name__}")
    if "salt" in payload:
        raise InvalidEntryError("payload key 'salt' is reserved (the store adds it)")
    text, stored = normalise_body({**payload, "salt": secrets.token_hex(16)}, "payload")
    return text, stored, payload_digest(text.encode("utf-8"))


def normalise_body(body: Mapping[str, Any], what: str = "body") -> tuple[str, dict[str, Any]]:
    """The body's canonical JSON text, and its JSON round-trip: exactly what the database will hand back.

    The text is what is hashed and stored. Canonical JSON of a body whose
    dicts all have string keys is also canonical JSON of its round-trip, so
    it is serialised once; other keys (``{2: …, 10: …}``) are sorted as
    numbers but read back as strings, so such a body is serialised again from
    its round-trip, or the stored entry would not verify. The round-trip
    equals the body exactly when every key is a string (a number, ``True`` or
    ``None`` never equals its string) and nothing else changed on the way
    (a tuple reads back as a list): one comparison in C instead of a walk
    over the body in Python, and a body that differs is simply serialised again.
    """
    if type(body) is not dict:
        if not isinstance(body, Mapping):
            raise InvalidEntryError(f"{what} must be a mapping, not {type(body).__name__}")
        body = dict(body)
    quick = _quick_canonical(body)
    if quick is not None:
        return quick
    try:
        text = canonical_text(body)
        stored = json.loads(text)
        if stored != body:
            text = canonical_text(stored)
        text.encode("utf-8")  # lone surrogates are JSON text but not UTF-8: refuse them here
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidEntryError(f"{what} is not plain JSON: {exc}") from exc
    return text, stored


class _Respelled(Exception):
    """A float msgspec spelled otherwise than ``json.dumps`` would (``1e16`` for ``1e+16``)."""


def _float_as_written(text: str) -> float:
    """msgspec's float ``text`` read back, if it is exactly ``repr`` of its value: ``json.dumps``'s spelling."""
    value = float(text)
    if repr(value) != text:
        raise _Respelled(text)
    return value


#: Deepest nesting the quick way keeps. msgspec recurses a few levels deeper than ``json`` before its
#: ``RecursionError``: near the limit its text would be stored where ``canonical_text`` refused the body
#: (and could not write the entry again: an exported bundle). Deeper bodies take the slow way, which decides.
QUICK_DEPTH = 100
#: Brackets as +1 (open) / -1 (close) bytes, everything else deleted: the depth of canonical text in C.
_BRACKET_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[{]}")


def _deeper_than(data: bytes, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep in the JSON ``data`` (brackets in strings
    do not count: escaped backslashes and quotes go first, then every other quote-delimited run)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(unescaped.split(b'"')[::2])
    steps = array("b", outside_strings.translate(_BRACKET_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0) > limit


#: msgspec's canonical JSON (keys sorted by code point, compact, UTF-8 unescaped) and its reader, which
#: refuses a float spelled otherwise than ``json.dumps`` would.
_SORTED_ENCODER: Final = msgspec.json.Encoder(order="sorted")
_DECODER: Final = msgspec.json.Decoder(float_hook=_float_as_written)


def _quick_canonical(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """:func:`normalise_body`'s text and round-trip written by msgspec, or None to take the slow way.

    About a quarter of the CPU. Kept only where the text is provably the one
    :func:`canonical_text` writes: msgspec sorts keys by code point as
    ``sort_keys`` does, escapes exactly the same characters and writes
    integers alike (``tests/audit/test_quick_canonical.py`` holds it to
    that); a float it spells otherwise (``1e16`` for ``1e+16``, ``0.00001``
    for ``1e-05``: ``json.dumps`` writes ``repr``) stops the read-back; and
    the text must read back equal to the body, which leaves out everything
    msgspec writes and ``json.dumps`` refuses or writes otherwise (NaN and
    infinities, which msgspec writes as ``null``; datetimes, sets, bytes,
    plain enums, …; tuples; keys that are not strings, which msgspec refuses
    when sorting). The slow way then gives the text, or the error, it always
    gave; lone surrogates too (msgspec refuses them), and bodies nested more
    than :data:`QUICK_DEPTH` deep (msgspec goes deeper than ``json`` can).
    """
    try:
        data = _SORTED_ENCODER.encode(body)
        if _deeper_than(data, QUICK_DEPTH):
            return None
        stored = _DECODER.decode(data)
        if stored != body:
            return None
        return data.decode("utf-8"), stored
    except Exception:  # anything msgspec refuses (or an odd value's __eq__ raises): the slow way decides
        return None
