"""Terminal entries the database refused, kept in Redis until it takes them.

Workers and the gateway both keep and retry them; the database's unique
terminal constraint settles duplicates, so retriers may race. Entries are
sealed, since they can hold output. See docs/architecture.md, "Design notes
by package" (workers).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
import redis

from audit import AuditEntry, AuditError, DuplicateTerminalError, EntryStore, InvalidEntryError
from workers.contract.handover import PENDING_KEY as HAND_OVER_PENDING_KEY
from workers.contract.privacy import split_texts
from workers.contract.unsettled import note_unsettled

log = logging.getLogger(__name__)

#: Redis hash: request id -> sealed JSON of the terminal entry waiting to be written (named where the take
#: script, in a worker's main process that never imports the audit store, can import it too).
PENDING_KEY = HAND_OVER_PENDING_KEY

Seal = Callable[[bytes], bytes]


@dataclass(frozen=True)
class PendingTerminal:
    """The arguments of one :meth:`AuditStore.append` that has not happened yet."""

    kind: str
    request_id: str
    principal: str | None
    team: str | None
    model: str | None
    body: dict[str, Any]
    policy_revision: str | None
    #: When the first write failed (epoch seconds); the horizon counts from here.
    since: float = field(default_factory=time.time)
    #: Not written by a retry before this time (epoch seconds): a fallback kept while its gateway may
    #: still record the request's real end (a handed-over output being judged; see ``output_check``).
    not_before: float = 0.0
    #: A hand-over's fallback only: the report it stands in for (``output`` as generated, ``handed_over``: the
    #: counts, finish reason and timings), so a gateway whose report was lost still judges the output itself.
    #: Kept as sealed as the rest and gone with the entry; never written to the audit.
    report: dict[str, Any] | None = None


class PendingTerminals:
    """The pending terminal entries of all gateways and workers on one Redis."""

    def __init__(self, client: redis.Redis, *, horizon_s: float, seal: Seal, unseal: Seal) -> None:
        self._client = client
        self._horizon_s = horizon_s
        self._seal = seal
        self._unseal = unseal

    def keep(self, entry: PendingTerminal, *, replace: bool = False) -> bool:
        """Keep ``entry`` until it can be written; the first kept for a request wins (like the database).

        ``replace``: this entry says more than one kept earlier for the request (a handed-over output's
        fallback, replaced by the judged end that the database refused).
        """
        try:
            if replace:
                self._client.hset(PENDING_KEY, entry.request_id, self.sealed(entry))
            else:
                self._client.hsetnx(PENDING_KEY, entry.request_id, self.sealed(entry))
        except redis.RedisError as exc:
            log.error("cannot keep the %s entry of %s for a later write: %s", entry.kind, entry.request_id, exc)
            return False
        log.warning("kept the %s entry of %s to write when the audit store is back", entry.kind, entry.request_id)
        return True

    def sealed(self, entry: PendingTerminal) -> bytes:
        """``entry`` as it is kept under :data:`PENDING_KEY` (for a caller that sends it in its own pipeline).

        msgspec encodes the dataclass as ``json.dumps(asdict(entry))`` would, without ``asdict``'s deep
        copy: a worker seals a fallback for every handed-over output, and those two were a tenth of its
        pool process's CPU per job.
        """
        return self._seal(msgspec.json.encode(entry))

    def holds(self, request_id: str) -> bool:
        """Whether an entry of the request waits here; raises ``redis.RedisError`` when Redis cannot say."""
        return bool(self._client.hexists(PENDING_KEY, request_id))

    def count(self) -> int:
        try:
            return int(self._client.hlen(PENDING_KEY))
        except redis.RedisError:
            return 0

    def write_one(self, store: EntryStore, request_id: str) -> AuditEntry | None:
        """Write the request's pending entry, if it has one; return the request's terminal entry then.

        None when nothing is pending for it. Raises :class:`AuditError` when
        the database still refuses (the entry stays pending).
        """
        try:
            raw = self._client.hget(PENDING_KEY, request_id)
        except redis.RedisError as exc:
            log.error("cannot read pending terminal entry of %s: %s", request_id, exc)
            return None
        if raw is None:
            return None
        return self._write(store, request_id, raw)

    def write_all(self, store: EntryStore) -> int:
        """Write every pending entry the database takes now; stop at the first refusal. Returns how many.

        Each one written is named for the gateways to settle its usage (:mod:`workers.contract.unsettled`).

        An entry kept with a ``not_before`` still ahead is left for later (its gateway may yet record
        the request's end); :meth:`write_one`, asked by the request's own gateway, writes it at once.
        """
        try:
            pending = self._client.hgetall(PENDING_KEY)
        except redis.RedisError as exc:
            log.error("cannot read pending terminal entries: %s", exc)
            return 0
        written = 0
        for key, raw in pending.items():
            request_id = key.decode() if isinstance(key, bytes) else key
            try:
                if self._write(store, request_id, raw, due_only=True) is not None:
                    written += 1
                    # Written by a retry, not by the request's gateway (write_one): that gateway may be gone,
                    # and a hand-over's fallback is written only when it never recorded the end.
                    note_unsettled(self._client, request_id)
            except AuditError as exc:
                log.error("audit store still refuses pending terminal entries (%d waiting): %s",
                          len(pending) - written, exc)
                break
        return written

    def _write(self, store: EntryStore, request_id: str, raw: bytes, *,
               due_only: bool = False) -> AuditEntry | None:
        try:
            opened = self._unseal(raw)
        except Exception as exc:  # sealed under another key: its owner (who holds that key) will write it
            log.error("cannot unseal the pending terminal entry of %s (%s): is the payload key shared?",
                      request_id, type(exc).__name__)
            return None
        try:
            fields = json.loads(opened)
            entry = PendingTerminal(**{k: v for k, v in fields.items() if k in PendingTerminal.__dataclass_fields__})
        except Exception as exc:  # opened but corrupted: can never be written
            log.error("dropping unreadable pending terminal entry of %s: %s", request_id, exc)
            self._forget(request_id)
            return None
        if due_only and entry.not_before > time.time():  # its gateway may still record the real end
            return None
        if time.time() - entry.since > self._horizon_s:
            log.error("giving up the %s entry of %s: not writable for %.0f s (horizon %.0f s)", entry.kind,
                      request_id, time.time() - entry.since, self._horizon_s)
            self._forget(request_id)
            return None
        body = {**entry.body, "recorded_late": {"since": entry.since}}
        try:
            metadata, texts = split_texts(body)  # the output goes to the erasable payload
            written = store.append(entry.kind, request_id, principal=entry.principal, team=entry.team,
                                   model=entry.model, body=metadata, policy_revision=entry.policy_revision,
                                   payload=texts)
        except DuplicateTerminalError:
            written = store.terminal_for(request_id)
        except InvalidEntryError as exc:  # would be refused forever and hold up the others
            log.error("dropping pending %s entry of %s the store cannot take: %s", entry.kind, request_id, exc)
            self._forget(request_id)
            return None
        self._forget(request_id)
        log.info("wrote the pending %s entry of %s", entry.kind, request_id)
        return written

    def _forget(self, request_id: str) -> None:
        try:
            self._client.hdel(PENDING_KEY, request_id)
        except redis.RedisError as exc:  # written already: a later retry meets the unique constraint
            log.warning("cannot drop written pending entry of %s: %s", request_id, exc)
