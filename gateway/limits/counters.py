"""Usage counters that every gateway replica shares and no request can race.

Every call is one atomic Lua script (:mod:`gateway.limits.scripts`): a
limit is only a limit if checking and recording usage are one step. One
call reads the snapshot the policy needs and the model's queue depth and
may reserve in the same step; one more settles or releases. A reserving
call that gets no answer may still run (a frozen Redis runs what sits in
its socket when it resumes), and its caller refuses the request: what it
took is given back in the background, barred by a tombstone, retried until
Redis answers (``gateway/limits/later.py``). Reservations, key layout, time
and the cost in Redis commands: docs/architecture.md, "Usage counters".
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import hashlib
import math
import re
import time
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, AsyncIterator, Sequence
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.limits import scripts
from gateway.limits.admitting import ADMITTING_TTL_S
from gateway.limits.catalogue import LIMIT_NAMES, MINUTE_WINDOW_FREES_IN, USAGE_LIMITS, UsageLimit
from gateway.limits.later import LaterCalls

_US = 1_000_000
_DAY_US = 86_400 * _US
WINDOW_S = 60
_WINDOW_US = WINDOW_S * _US
#: A scope's keys live this long after they are created or a month begins:
#: more than a month, so an active scope's keys never expire under it.
_SCOPE_TTL_MS = 62 * 86_400 * 1000
_RECORD_TTL_MS = 2 * 86_400 * 1000
_MAX_NAME = 100


class CountersUnavailable(RuntimeError):
    """Redis could not be reached or did not answer: the gateway must fail closed (503).

    ``answered``: Redis did answer, with an error (out of memory, read-only): the call is over and did
    not take effect. Otherwise (a timeout, a lost connection) it may have run, or may still run.
    """

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


def _unavailable(exc: BaseException) -> CountersUnavailable:
    return CountersUnavailable(f"usage counters unavailable: {type(exc).__name__}: {exc}",
                               answered=isinstance(exc, ResponseError))


@dataclass(frozen=True)
class Scope:
    """Whose usage a counter holds: one principal, or one team."""

    kind: str
    name: str

    def __post_init__(self) -> None:
        if self.kind not in ("principal", "team"):
            raise ValueError(f"scope kind must be 'principal' or 'team', not {self.kind!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a {self.kind} name must be a non-empty string")


@dataclass(frozen=True)
class Reservation:
    """What admission took; ``settle`` or ``release`` needs exactly this back.

    ``at`` fixes which UTC day and month the tokens are charged to, so a
    request admitted at 23:59 and finished at 00:01 adjusts yesterday.
    """

    request_id: str
    scopes: tuple[Scope, ...]
    tokens: int
    at: float
    #: The model's admitting hash (``gateway/limits/admitting.py``) where the request holds its place in the
    #: queue until it is queued; a release or undo gives that place back too (None: it holds none, reserved
    #: without a queue check, or early, before its decision: its push takes the place, ``admit``'s ``place``).
    admitting: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "tokens": self.tokens, "at": self.at,
                "scopes": [{"kind": s.kind, "name": s.name} for s in self.scopes], "admitting": self.admitting}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Reservation":
        return cls(str(data["request_id"]), tuple(Scope(s["kind"], s["name"]) for s in data["scopes"]),
                   int(data["tokens"]), float(data["at"]), data.get("admitting"))


@dataclass(frozen=True)
class HeldRecord:
    """A reservation its request's record still holds, as read from the principal's counters hash by a
    caller that knows nothing else of the request (``gateway/requests/stale_reservations.py``).

    The names are spelt as the keys spell them (escaped, maybe hashed), since
    that is all the record has and all giving it back needs. ``team_key`` is
    None for a principal without a team, and for a record written before
    records named the team (2026-12-06): that one is given back in the
    principal's scope only, and its team's slot frees at its TTL.
    ``wait_s``: how long the reserving gateway may take to record an admitted
    request (its ``record_wait_s``; None: not said, a record from before).
    """

    request_id: str
    principal_key: str
    team_key: str | None
    tokens: int
    at: float
    wait_s: float | None = None


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted, and when it could be.

    ``retry_after_s`` is the earliest whole second at which every limit that
    refused this request would admit it if nothing else changed: of all the
    limits that fail, the refusal reported is the one with the LONGEST wait
    (ties: principal before team, then ``LIMIT_NAMES`` order), because
    telling a client to come back after the shortest wait would just earn it
    another refusal.
    """

    code: str
    scope: Scope
    limit_name: str
    limit: int
    used: int
    retry_after_s: int
    message: str
    #: The request alone costs more than the limit (prompt and ``max_tokens`` over a token limit, any request
    #: over a limit of 0): no wait lets it pass, so ``retry_after_s`` is when the window turns, not a promise.
    never_fits: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retry_after_s": self.retry_after_s,
                "scope": {"kind": self.scope.kind, "name": self.scope.name},
                "limit_name": self.limit_name, "limit": self.limit, "used": self.used}


# --- helpers ---------------------------------------------------------------

# The scripts count integer microseconds: a Lua number (a double) holds them
# exactly (epoch µs are about 2**51, doubles are exact to 2**53), and callers
# pass ``now`` so tests control the clock. Replicas' clocks must agree (NTP).
def _micros(now: float | None) -> int:
    return round((time.time() if now is None else now) * _US)


def _ceil_s(micros: int) -> int:
    return -(-micros // _US)


def _escape(name: str) -> str:
    """An injective, key-safe spelling of a user-controlled name."""
    quoted = quote(name, safe="")
    if len(quoted) <= _MAX_NAME:
        return quoted
    return "#" + hashlib.sha256(name.encode()).hexdigest()  # '#' never appears in a quoted name


@dataclass(frozen=True)
class _Periods:
    """The UTC day and month of an instant, as the scripts label them, and when they end."""

    day: str
    yesterday: str
    day_end_us: int
    month: str
    last_month: str
    month_end_us: int

    @classmethod
    def at(cls, now_us: int) -> "_Periods":
        return _periods_of_day(now_us // _DAY_US)

    @classmethod
    def of_day(cls, day_number: int) -> "_Periods":
        """The periods of UTC day ``day_number`` (days since the epoch)."""
        day = date(1970, 1, 1) + timedelta(days=day_number)
        next_day = day + timedelta(days=1)
        next_month = date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)
        last_month = day.replace(day=1) - timedelta(days=1)
        return cls(day.strftime("%Y%m%d"), (day - timedelta(days=1)).strftime("%Y%m%d"),
                   calendar.timegm(next_day.timetuple()) * _US, day.strftime("%Y%m"),
                   last_month.strftime("%Y%m"), calendar.timegm(next_month.timetuple()) * _US)


@functools.lru_cache(maxsize=4)
def _periods_of_day(day_number: int) -> _Periods:
    """Every reservation and settlement needs the labels of its day; they change once a day, so
    they are worked out once a day (eight ``strftime`` calls a request otherwise)."""
    return _Periods.of_day(day_number)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_RESERVED = (b"reserved ", "reserved ")  # a record's beginning while it holds a reservation (bytes or str)


def _glob_escape(text: str) -> str:
    """``text`` as a Redis glob pattern that matches only itself (a prefix may hold ``[``, ``*``...)."""
    return re.sub(r"([\\\[\]*?])", r"\\\1", text)


def _held_record(request_id: str, principal_key: str, record: str, before_us: int) -> HeldRecord | None:
    """A request's record ('reserved tokens time(µs) wait(s) [team]', or from before 2026-12-06 'reserved
    tokens time(µs)') as a :class:`HeldRecord` when it still holds a reservation made before ``before_us``;
    None otherwise (ended, younger, or unreadable)."""
    parts = record.split(" ")
    if len(parts) < 3 or parts[0] != "reserved":
        return None
    try:
        tokens, at_us = int(parts[1]), int(parts[2])
        wait_s = float(parts[3]) if len(parts) > 3 and parts[3] != "-" else None
    except ValueError:
        return None
    if at_us >= before_us:
        return None
    team = parts[4] if len(parts) > 4 and parts[4] else None
    return HeldRecord(request_id, principal_key, team, tokens, at_us / _US, wait_s)


def _positive(text: str) -> float | None:
    """A measured time read back from Redis; None when absent or not a positive number."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < float("inf") else None


def _limit(value: Any, where: str) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"limit {where} must be a non-negative integer or None, not {value!r}")
    return value


def _limit_args(limits: dict | None, where: str) -> list[int]:
    limits = limits or {}
    unknown = set(limits) - set(LIMIT_NAMES)
    if unknown:
        raise ValueError(f"unknown {where} limit(s) {sorted(unknown)}; known: {list(LIMIT_NAMES)}")
    return [_limit(limits.get(name), f"{where}.{name}") for name in LIMIT_NAMES]


_PERIODS = {"minute": "in the last minute", "day": "today", "month": "this month"}


def _message(scope: Scope, limit: UsageLimit, value: int, used: int, tokens: int) -> str:
    who = f"{scope.kind} '{scope.name}'"
    if limit.cost == "request":
        if limit.window == "in_flight":
            return f"{who} has {used} of {value} allowed requests in flight"
        return f"{who} has made {used} of {value} requests allowed per {limit.window}"
    text = f"{who} has used {used} of {value} tokens {_PERIODS[limit.window]}"
    if tokens > value:
        return f"{text}; this request alone needs {tokens}, more than the limit"
    return f"{text}; this request needs {tokens}"


# --- what a call answers ---------------------------------------------------------

@dataclass(frozen=True)
class QueueCheck:
    """The model's queue, checked in the same step as the reservation.

    fifo (``team`` None): ``keys`` are the Redis lists that hold its waiting
    messages (one per priority); a request is refused while ``limit`` or
    more wait. Fair share (``team`` the requester's field in the waiting
    hash): ``keys`` are the model's waiting hash, the shares hash, its tags
    hash and the live workers' set, and a request is refused while its team
    holds its cap of places (``gateway/limits/fair_share.py``) or all teams
    together hold twice ``limit``. ``worker_prefix``: the model's members in
    the live workers' set. ``admitting``: the model's hash of places held by
    requests admitted but not yet queued (``gateway/limits/admitting.py``),
    counted with the queue's jobs (per team in fair mode); an admitted
    request takes its place there in the same step.
    """

    keys: tuple[str, ...]
    limit: int
    team: str | None = None
    worker_prefix: str = ""
    admitting: str = ""

    def __post_init__(self) -> None:
        if not self.admitting:
            raise ValueError("a queue check needs the model's admitting hash")


@dataclass(frozen=True)
class TeamPlaces:
    """A fair-share refusal's figures: the team's places in the model's queue and how fast they free."""

    #: The team's waiting jobs, and the places it may hold.
    waiting: int
    cap: int
    #: The team's weight, and the sum of the weights of the teams with jobs waiting (its own included).
    weight: float
    waiting_weight: float
    #: The workers' mean service time of one job (ms), None while unmeasured.
    service_ms: float | None
    live_workers: int
    #: Refused because all teams together hold twice the limit, not (only) by the team's cap.
    at_ceiling: bool

    @property
    def share(self) -> float:
        """The team's fraction of the waiting teams' weight: its fraction of the workers while they wait."""
        return self.weight / self.waiting_weight if self.waiting_weight > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"waiting": self.waiting, "cap": self.cap, "weight": self.weight,
                "waiting_weight": self.waiting_weight, "share": round(self.share, 6),
                "service_ms": self.service_ms, "live_workers": self.live_workers, "at_ceiling": self.at_ceiling}


@dataclass(frozen=True)
class QueueAtLimit:
    """The model's queue (fifo), or the team's places in it (fair), are full: nothing was reserved.

    ``waiting`` is the model's total; ``team`` is set in fair mode.
    """

    waiting: int
    limit: int
    team: TeamPlaces | None = None


@dataclass(frozen=True)
class CountersReply:
    """One call's answer: the usage before it, the queue depth, and the reservation's outcome.

    ``usage`` is shaped as the policy input's ``usage`` document and never
    includes this request; ``waiting`` is None when no queue was read;
    ``outcome`` is None when nothing was to be reserved.
    """

    usage: dict[str, Any]
    waiting: int | None
    outcome: Reservation | Refusal | QueueAtLimit | None


def queue_at_limit(reply: list, queue: QueueCheck) -> QueueAtLimit:
    """A script's ``{'queue_full', depth, ...}`` refusal (``gateway/limits/places_lua.py``: the admit
    script's and the push's) as a :class:`QueueAtLimit`."""
    if queue.team is None:
        return QueueAtLimit(int(reply[1]), queue.limit)
    team_waiting, cap, weight, waiting_weight, svc, live, ceiling = reply[2:9]
    return QueueAtLimit(int(reply[1]), queue.limit, TeamPlaces(
        waiting=int(team_waiting), cap=int(cap), weight=float(_text(weight)),
        waiting_weight=float(_text(waiting_weight)), service_ms=_positive(_text(svc)),
        live_workers=int(live), at_ceiling=int(ceiling) == 1))


# --- the counters ------------------------------------------------------------

class UsageCounters:
    """Per-principal and per-team usage, checked and recorded atomically."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "govgate:usage",
                 in_flight_ttl_s: float = 900, admitting_ttl_s: float = ADMITTING_TTL_S,
                 record_wait_s: float | None = None) -> None:
        """``admitting_ttl_s``: how long an admitted request holds its place in the queue unqueued
        before it is no longer counted (``gateway/limits/admitting.py``). ``record_wait_s``: how long this
        gateway may take from a reservation to its request's entry, kept in each reservation's record so
        that another gateway does not take it for stale sooner (``gateway/requests/stale_reservations.py``)."""
        if in_flight_ttl_s <= 0 or admitting_ttl_s <= 0:
            raise ValueError("in_flight_ttl_s and admitting_ttl_s must be positive")
        if record_wait_s is not None and not 0 < record_wait_s < float("inf"):
            raise ValueError("record_wait_s must be positive and finite")
        self._record_wait = "-" if record_wait_s is None else str(math.ceil(record_wait_s))
        self._client = client
        self._tag = "{" + prefix + "}"
        self._fly_ttl_us = round(in_flight_ttl_s * _US)
        self._hold_ttl_us = round(admitting_ttl_s * _US)
        # give-backs that could not be made at once (a cancelled or failed reserve, a release that
        # failed), retried until Redis answers; after the in-flight TTL a held slot has expired anyway
        self._later = LaterCalls((CountersUnavailable,), give_up_after_s=in_flight_ttl_s)

    @property
    def record_wait_s(self) -> float | None:
        """How long this gateway may take from a reservation to its request's entry (None: not said)."""
        return None if self._record_wait == "-" else float(self._record_wait)

    # keys

    def _record_key(self, request_id: str) -> str:
        return f"{self._tag}:r:{_escape(request_id)}"

    # The key layout is a table in docs/architecture.md, "Usage counters"; all
    # keys share the hash tag, so one script may touch them on Redis Cluster.
    def _scope_keys(self, scope: Scope) -> list[str]:
        return self._keys_of(scope.kind[0], _escape(scope.name))

    def _keys_of(self, kind: str, escaped: str) -> list[str]:
        """The keys of the scope of kind ``kind`` ('p' or 't') whose escaped name is ``escaped``."""
        return [f"{self._tag}:{kind}:{escaped}:{name}" for name in scripts.SCOPE_KEYS]

    @staticmethod
    def _scopes(principal: str, team: str | None) -> tuple[Scope, ...]:
        principal_scope = Scope("principal", principal)
        return (principal_scope,) if team is None else (principal_scope, Scope("team", team))

    async def _run(self, script: scripts.Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await script(self._client, keys, args)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    # reads

    async def snapshot(self, principal: str, team: str | None, *, now: float | None = None) -> dict:
        """Current usage, shaped as the policy input's ``usage`` document."""
        return (await self.admit(None, principal, team, None, 0, now=now)).usage

    async def held(self, request_id: str, principal: str, team: str | None) -> Reservation | None:
        """The request's reservation if it still holds tokens, for a caller that no longer has it.

        Read from the request's record (its tokens and the time that fixes
        its day and month: a field of the principal's counters hash, or, written
        by an older gateway, a key of its own); None once settled, released or expired.
        """
        principal_hash = self._scope_keys(Scope("principal", principal))[1]
        try:
            record = await self._client.hget(principal_hash, f"r:{request_id}") \
                or await self._client.get(self._record_key(request_id))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        if record is None:
            return None
        state, tokens, at = _text(record).split(" ")[:3]  # (a reserved one's wait and team follow)
        if state != "reserved":
            return None
        return Reservation(request_id, self._scopes(principal, team), int(tokens), int(at) / _US)

    async def in_flight_slots(self, scope: Scope, *, now: float | None = None,
                              most: int = 256) -> list[tuple[str, float]]:
        """The scope's requests in flight now (at most ``most``), as (request id, admitted at, Unix s).

        Read from their slots in the window's sorted set (scored minus their
        expiry, the admission time plus ``in_flight_ttl_s``); for the 429's
        estimate of when one ends (``gateway/limits/in_flight_wait.py``).
        """
        now_us = _micros(now)
        try:
            rows = await self._client.zrangebyscore(self._scope_keys(scope)[0], "-inf", f"(-{now_us}",
                                                    start=0, num=most, withscores=True)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return [(_text(member)[1:], (-score - self._fly_ttl_us) / _US) for member, score in rows]

    # writes

    async def reserve(self, request_id: str, principal: str, team: str | None, limits: dict, tokens: int,
                      *, now: float | None = None) -> Reservation | Refusal:
        """Admit one request of up to ``tokens`` tokens, or say which limit refuses it.

        All limits of both scopes are checked against usage plus this request
        (1 request, ``tokens`` tokens, 1 in flight) and, only if all pass,
        recorded, in one script; when several limits refuse, the one with the
        longest wait is reported (see :class:`Refusal`). Calling again with the same ``request_id``
        returns the first reservation without counting twice; that also makes
        redis-py's automatic re-send of a command after a timeout harmless.
        """
        if not isinstance(request_id, str) or not request_id or request_id.startswith("\0"):
            raise ValueError("request_id must be a non-empty string not beginning with NUL")
        outcome = (await self.admit(request_id, principal, team, limits, tokens, now=now)).outcome
        assert isinstance(outcome, (Reservation, Refusal))  # no queue was checked
        return outcome

    async def admit(self, request_id: str | None, principal: str, team: str | None, limits: dict | None,
                    tokens: int, *, queue: QueueCheck | None = None, replace: Reservation | None = None,
                    place: bool = True, now: float | None = None) -> CountersReply:
        """Read usage and the queue depth and, given ``limits``, reserve ``tokens``: one script.

        ``usage`` in the reply is what the counters held before this call, so
        the policy may judge it although the reservation was already made.
        ``limits`` None only reads (``request_id`` may then be None).
        ``queue``: refuse (:class:`QueueAtLimit`, nothing reserved) while the
        queue holds its limit, in the same step, so no request slips in
        between the check and the reservation. ``replace``: the reservation
        this request already holds is given back first, in the same step (a
        reservation made under limits the policy then did not oblige).
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative integer, not {tokens!r}")
        scopes = self._scopes(principal, team)
        limit_args: list[int] = []
        if limits is not None:
            if not isinstance(request_id, str) or not request_id or request_id.startswith("\0"):
                # (a NUL first marks a request's in-flight slot in the window's sorted set)
                raise ValueError("request_id must be a non-empty string not beginning with NUL")
            limit_args = _limit_args(limits.get("principal"), "principal")
            if team is not None:
                limit_args += _limit_args(limits.get("team"), "team")
        now_us = _micros(now)
        periods = _Periods.at(now_us)
        replaced = _Periods.at(round(replace.at * _US)) if replace is not None else periods
        keys = [self._record_key(request_id or "-")] + [k for s in scopes for k in self._scope_keys(s)]
        keys += (queue.admitting, *queue.keys) if queue is not None else ()
        admitting = queue.admitting if queue is not None and limits is not None and place else None
        args = [now_us, _WINDOW_US, len(scopes), request_id or "-", "snapshot" if limits is None else "reserve",
                tokens, now_us + self._fly_ttl_us, _SCOPE_TTL_MS, _RECORD_TTL_MS, periods.day_end_us,
                periods.month_end_us, periods.day, periods.yesterday, periods.month, periods.last_month,
                queue.limit if queue is not None else -1, 1 if replace is not None else 0, replaced.day,
                replaced.month, "fair" if queue is not None and queue.team is not None else "",
                queue.team if queue is not None and queue.team is not None else "",
                queue.worker_prefix if queue is not None else "", now_us + self._hold_ttl_us if place else "",
                self._record_wait, *limit_args]
        try:
            reply = await self._run(scripts.ADMIT, keys, args)
        except asyncio.CancelledError:
            if limits is not None:  # the script may have run although we will never see its reply
                assert request_id is not None
                self._give_back_later(Reservation(request_id, scopes, tokens, now_us / _US, admitting), "released")
            raise
        except CountersUnavailable as exc:
            if limits is not None and not exc.answered:
                # The script may have run, or may still run: a timed-out call stays in the socket of a
                # frozen Redis, which runs it when it resumes. The caller refuses the request, so it must
                # hold nothing: undone, and barred (a tombstone) against the script still on its way.
                assert request_id is not None
                self._give_back_later(Reservation(request_id, scopes, tokens, now_us / _US, admitting), "undone",
                                      failed=exc, bar=True)
            raise
        views = [
            {**{limit.counter: int(value) for limit, value in zip(USAGE_LIMITS, u)},
             MINUTE_WINDOW_FREES_IN: _ceil_s(int(u[len(USAGE_LIMITS)]))}
            for u in reply[:len(scopes)]
        ]
        usage = {"principal": views[0], "team": views[1] if team is not None else None}
        waiting = int(reply[len(scopes)])
        return CountersReply(usage, None if waiting < 0 else waiting,
                             self._outcome(reply[len(scopes) + 1], request_id, scopes, tokens, now_us, queue,
                                           admitting))

    def _outcome(self, reply: list, request_id: str | None, scopes: tuple[Scope, ...], tokens: int, now_us: int,
                 queue: QueueCheck | None, admitting: str | None) -> Reservation | Refusal | QueueAtLimit | None:
        kind = _text(reply[0])
        if kind == "snapshot":
            return None
        assert request_id is not None
        if kind == "reserved":
            return Reservation(request_id, scopes, tokens, now_us / _US, admitting)
        if kind == "held":
            return Reservation(request_id, scopes, int(reply[2]), int(reply[3]) / _US, admitting)
        if kind == "queue_full":
            assert queue is not None
            return queue_at_limit(reply, queue)
        scope_index, limit_index, limit, used, wait_us = (int(v) for v in reply[1:])
        scope = scopes[scope_index - 1]
        refusing = USAGE_LIMITS[limit_index - 1]
        cost = tokens if refusing.cost == "tokens" else 1
        return Refusal(code=refusing.code, scope=scope, limit_name=refusing.name, limit=limit, used=used,
                       retry_after_s=max(1, _ceil_s(wait_us)),
                       message=_message(scope, refusing, limit, used, tokens), never_fits=cost > limit)

    async def settle(self, reservation: Reservation, actual_tokens: int, *, now: float | None = None) -> None:
        """The request finished having used ``actual_tokens``: replace the
        reservation by that count everywhere it was counted (minute window
        while the request is still in it, its day and month), and release
        its in-flight slot. A count above the reservation is recorded as is
        (usage is usage). A second settle, or a settle after a release,
        changes nothing."""
        if isinstance(actual_tokens, bool) or not isinstance(actual_tokens, int) or actual_tokens < 0:
            raise ValueError(f"actual_tokens must be a non-negative integer, not {actual_tokens!r}")
        await self._finish(reservation, "settled", actual_tokens, now)

    async def release(self, reservation: Reservation, *, now: float | None = None) -> None:
        """The request failed, timed out or was cancelled and produced nothing:
        its tokens are given back and its in-flight slot freed, but it stays a
        request in the rate window (it was made). Idempotent, and a no-op
        after a settle."""
        await self._finish(reservation, "released", 0, now)

    async def undo(self, reservation: Reservation, *, now: float | None = None) -> None:
        """Take back a reservation made ahead of a decision that did not admit
        the request: as if it was never made (it leaves the rate window too,
        as a denied request never entered it). A no-op once settled or released."""
        await self._finish(reservation, "undone", 0, now)

    async def _finish(self, reservation: Reservation, mode: str, actual: int, now: float | None, *,
                      bar: bool = False) -> bool:
        scope_keys = [k for s in reservation.scopes for k in self._scope_keys(s)]
        # a request given back before it was queued frees its place in the queue with it (a settled one
        # was queued: its push took the place back, so a settle sends no HDEL)
        admitting = reservation.admitting if mode != "settled" else None
        return await self._finish_keys(reservation.request_id, scope_keys, admitting, mode, actual, now,
                                       reservation.tokens, reservation.at, bar=bar)

    async def _finish_keys(self, request_id: str, scope_keys: list[str], admitting: str | None, mode: str,
                           actual: int, now: float | None, tokens: int, at: float, *, bar: bool = False) -> bool:
        """The finish script on the scopes whose keys are ``scope_keys``; True if it changed the record."""
        periods = _Periods.at(round(at * _US))
        keys = [self._record_key(request_id), *scope_keys]
        if admitting:
            keys.append(admitting)
        # a bar's tombstone is looked for by every reserve of the principal while it lives: it lives as
        # long as an in-flight slot (a reserve that arrives later would hold an expired one anyway)
        ttl_ms = self._fly_ttl_us // 1000 if bar else _RECORD_TTL_MS
        args = [_micros(now), _WINDOW_US, len(scope_keys) // len(scripts.SCOPE_KEYS), request_id, mode, actual,
                ttl_ms, periods.day, periods.month, tokens, round(at * _US)]
        if bar:
            args.append("1")
        return await self._run(scripts.FINISH, keys, args) == 1

    # the reservations held past their request (gateway/requests/stale_reservations.py)

    async def held_records(self, *, before: float, page: int = 100) -> AsyncIterator[list[HeldRecord]]:
        """The reservations still held that were made before ``before`` (Unix s), by page of principals.

        Off the request path: a SCAN of the principals' counters hashes, then
        one HSCAN of each (a page's in one pipeline) for its ``r:`` records, so
        a look costs the principals with counters, not their requests. Raises
        :class:`CountersUnavailable` when Redis does not answer.
        """
        before_us = _micros(before)
        prefix, suffix = f"{self._tag}:p:", f":{scripts.SCOPE_KEYS[1]}"
        pattern = _glob_escape(prefix) + "*" + suffix

        async def read(keys: list[bytes]) -> list[HeldRecord]:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hscan(key, 0, match="r:*", count=1000)
                replies = await pipe.execute()
            found = []
            for key, (cursor, fields) in zip(keys, replies):
                if cursor:  # a hash too large for one reply: all of it, again
                    fields = {f: v async for f, v in self._client.hscan_iter(key, match="r:*", count=1000)}
                principal_key = _text(key)[len(prefix):-len(suffix)]
                for field, value in fields.items():
                    # (most records are of ended requests, kept until their window entry leaves: skipped unread)
                    if value[:9] in _RESERVED and \
                            (held := _held_record(_text(field)[2:], principal_key, _text(value), before_us)):
                        found.append(held)
            return found

        try:
            keys: list[bytes] = []
            async for key in self._client.scan_iter(match=pattern, count=1000):
                keys.append(key)
                if len(keys) == page:
                    found, keys = await read(keys), []
                    if found:
                        yield found
            if keys and (found := await read(keys)):
                yield found
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def finish_held(self, held: HeldRecord, mode: str, actual_tokens: int = 0, *,
                          now: float | None = None) -> bool:
        """Undo, release or settle (``mode`` as :meth:`finish_later`'s) a reservation :meth:`held_records`
        read, in its principal's and team's scopes; False when it was ended meanwhile (nothing changed)."""
        if mode not in ("settled", "released", "undone"):
            raise ValueError(f"mode must be 'settled', 'released' or 'undone', not {mode!r}")
        scope_keys = self._keys_of("p", held.principal_key)
        if held.team_key is not None:
            scope_keys += self._keys_of("t", held.team_key)
        return await self._finish_keys(held.request_id, scope_keys, None, mode, actual_tokens, now, held.tokens,
                                       held.at)

    def finish_later(self, reservation: Reservation, mode: str, actual_tokens: int = 0, *,
                     failed: BaseException | None = None) -> None:
        """Settle (``mode`` "settled", to ``actual_tokens``), release or undo ``reservation`` in the
        background, retried until Redis answers: for a caller whose own call failed (``failed``).
        Each is idempotent, so a failed call that did run meanwhile is not counted twice."""
        doing = {"settled": "settling", "released": "releasing", "undone": "undoing"}.get(mode)
        if doing is None:
            raise ValueError(f"mode must be 'settled', 'released' or 'undone', not {mode!r}")
        self._later.start(f"{doing} the usage of {reservation.request_id}",
                          lambda: self._finish(reservation, mode, actual_tokens, None), failed=failed)

    def _give_back_later(self, reservation: Reservation, mode: str, *, failed: BaseException | None = None,
                         bar: bool = False) -> None:
        """Give back what a reserve call whose reply never came may have taken (its script ran, or will):
        a release or undo of its request id, retried until Redis answers. ``bar`` leaves a tombstone
        even when the reservation was there to give back: a failed replacement's script (which reads
        that tombstone) may still come. ``now`` is the call's, so the reservation's day is the call's."""
        now = reservation.at
        self._later.start(f"giving back what the reserve of {reservation.request_id} may have taken",
                          lambda: self._finish(reservation, mode, 0, now, bar=bar), failed=failed)

    async def aclose(self) -> None:
        """Give the give-backs still retrying a last chance (about one Redis timeout), then stop them."""
        await self._later.aclose()
