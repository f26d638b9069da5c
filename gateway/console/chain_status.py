"""The chain page's figures: entries, the last checkpoint, and "verified up to entry N" without a full walk.

A full ``govgate audit verify`` of a million entries takes seconds of every
core; a page view cannot pay that. So the console verifies incrementally:
Redis keeps how far the chain has been verified (the seq, its hash and the
format boundary in force there), and each chain page view walks at most
:data:`STEP` more entries with the same checks as ``verify``
(:func:`audit.verify_walk.walk_range`), holding the first new entry to the
kept hash exactly as verify holds each entry to the one before. One replica
walks at a time (a Redis lock); the others show the figure as it stands.

What this does not prove: an entry edited after the console verified it
(the walk does not go back; only the last verified entry's hash and the
latest checkpoint's entry are compared again on each view). A full
``govgate audit verify`` catches that (the signed checkpoints too when the
chain was rewritten with fresh hashes, not for an edit in place, whose
stored hash no longer matches its content but still matches the
checkpoint); the page says so and points at the command. Once a
problem is found it is kept and shown until the operator deletes the
``govgate:console:verified:*`` key after investigating. The state is kept
per chain, named by the hash of its first entry.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Final, TypeVar

import anyio.to_thread
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import Engine

from audit import AuditError
from audit.chain import GENESIS_HASH
from audit.checkpoints import Checkpoint, CheckpointStore
from audit.db import DB_ERRORS
from audit.verify_walk import RangeResult, gap_problem, link_problem, walk_range
from gateway.console.sessions import SessionStoreDown
from gateway.review.service import audit_unavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Prefix of the Redis hash holding how far a chain is verified (``:<first entry's hash>`` follows).
STATE_KEY: Final = "govgate:console:verified"
_LOCK_SUFFIX: Final = ":lock"
#: Entries one page view verifies at most: about 0.2 s of one core (SQLite, measured on a 60,000-entry store
#: built by bench/_audit_store.py, best of 3, load average ~10), so a view that catches up waits that long.
STEP: Final = 20_000
_LOCK_S: Final = 120


@dataclass(frozen=True)
class Verified:
    """How far the chain is known sound (``seq`` 0: nothing verified yet), or where it broke."""

    seq: int
    hash: str
    boundary: int | None
    at: float | None
    bad_seq: int | None = None
    problem: str | None = None


@dataclass(frozen=True)
class ChainStatus:
    head_seq: int
    head_time: object
    checkpoint: Checkpoint | None
    verified: Verified
    #: Set when this view could not verify further (the database failed mid-walk).
    note: str | None = None
    #: What the checkpoint's entry stores now, when it is not the hash the checkpoint signs (None: they
    #: match, or no checkpoint): the chain was rewritten under it, whatever the kept marker says.
    checkpoint_entry_hash: str | None = None


async def chain_status(client: aioredis.Redis, engine: Engine) -> ChainStatus:
    checkpoints = CheckpointStore(engine)
    head, latest = await _read(checkpoints.head), await _read(checkpoints.latest)
    if head is None:
        return ChainStatus(0, None, latest, Verified(0, GENESIS_HASH, None, None))
    # The state is kept per chain (named by its first entry's hash): gateways of another database on the
    # same Redis keep their own.
    first = await _read(partial(checkpoints.entry_hash, 1))
    state_key = f"{STATE_KEY}:{(first or 'none')[:32]}"
    verified = await _load(client, state_key)
    note = None
    if verified.problem is None and verified.seq > 0:
        now_hash = await _read(partial(checkpoints.entry_hash, verified.seq))
        if now_hash != verified.hash:  # the last verified entry itself was changed or removed since
            verified = replace(verified, bad_seq=verified.seq, at=time.time(),
                               problem=f"entry {verified.seq} no longer has the hash it had when verified")
            await _save(client, state_key, verified)
    if verified.problem is None and verified.seq < head[0] and await _lock(client, state_key):
        try:
            verified = await anyio.to_thread.run_sync(partial(advance, engine, verified, head[0]))
            await _save(client, state_key, verified)
        except DB_ERRORS as exc:
            log.error("console: chain verify step failed: %s", exc)
            note = "The database failed while verifying; the figure is where the last step left it."
        finally:
            await _unlock(client, state_key)
    return ChainStatus(head[0], head[2], latest, verified, note, await _checkpoint_mismatch(checkpoints, latest))


async def _checkpoint_mismatch(checkpoints: CheckpointStore, latest: Checkpoint | None) -> str | None:
    """The hash the latest checkpoint's entry stores, if it is not the one signed ("" for no entry).

    One row read. The marker kept in Redis is the console's own memory, and
    Redis is not the audit store: deleted (as the page tells an operator to
    do once a problem is looked into), lost with a fresh Redis, or edited,
    it let the page show a rewritten chain as verified and signed while
    ``verify`` found the checkpoints tampered. The checkpoint is held to its
    entry on every view.
    """
    if latest is None:
        return None
    stored = await _read(partial(checkpoints.entry_hash, latest.seq))
    return None if stored == latest.head_hash else (stored or "")


def advance(engine: Engine, verified: Verified, head_seq: int) -> Verified:
    """Verify the entries after ``verified.seq`` (up to :data:`STEP` of them, not past ``head_seq``)."""
    upto = min(head_seq, verified.seq + STEP)
    result: RangeResult = walk_range(engine, verified.seq, upto, verified.boundary, batch=5000)
    now = time.time()
    if result.first_seq is None:
        return verified
    expected_prev = verified.hash or GENESIS_HASH
    if result.first_seq != verified.seq + 1:
        return Verified(verified.seq, verified.hash, verified.boundary, now, result.first_seq,
                        gap_problem(verified.seq + 1, result.first_seq))
    if result.first_prev != expected_prev:
        return Verified(verified.seq, verified.hash, verified.boundary, now, result.first_seq,
                        link_problem(result.first_seq))
    seq = result.head_seq if result.head_seq is not None else verified.seq
    hash_ = result.head_hash if result.head_hash is not None else verified.hash
    return Verified(seq, hash_, result.boundary, now, result.bad_seq, result.problem)


async def _read(call: Callable[[], T]) -> T:
    """A checkpoint store read on a worker thread; the review API's 503 when the database fails."""
    try:
        return await anyio.to_thread.run_sync(call)
    except AuditError as exc:
        log.error("console: audit store unavailable: %s", exc)
        raise audit_unavailable() from None


async def _load(client: aioredis.Redis, state_key: str) -> Verified:
    try:
        raw = await client.hgetall(state_key)
    except (RedisError, OSError) as exc:
        raise SessionStoreDown(str(exc)) from None
    fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
              for k, v in raw.items()}
    try:
        return Verified(int(fields["seq"]), fields["hash"], int(fields["boundary"]) if fields.get("boundary") else None,
                        float(fields["at"]) if fields.get("at") else None,
                        int(fields["bad_seq"]) if fields.get("bad_seq") else None, fields.get("problem") or None)
    except (KeyError, ValueError):
        return Verified(0, GENESIS_HASH, None, None)


async def _save(client: aioredis.Redis, state_key: str, verified: Verified) -> None:
    fields = {"seq": str(verified.seq), "hash": verified.hash,
              "boundary": "" if verified.boundary is None else str(verified.boundary),
              "at": "" if verified.at is None else repr(verified.at),
              "bad_seq": "" if verified.bad_seq is None else str(verified.bad_seq), "problem": verified.problem or ""}
    try:
        await client.hset(state_key, mapping=fields)
    except (RedisError, OSError) as exc:
        raise SessionStoreDown(str(exc)) from None


async def _lock(client: aioredis.Redis, state_key: str) -> bool:
    try:
        return bool(await client.set(state_key + _LOCK_SUFFIX, "1", nx=True, ex=_LOCK_S))
    except (RedisError, OSError) as exc:
        raise SessionStoreDown(str(exc)) from None


async def _unlock(client: aioredis.Redis, state_key: str) -> None:
    try:
        await client.delete(state_key + _LOCK_SUFFIX)
    except (RedisError, OSError):
        pass  # it expires on its own
