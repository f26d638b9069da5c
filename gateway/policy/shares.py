"""Fair-share weights: read from the policy's data, published to Redis for the workers and admission.

A team's share (``govgate_config.teams.<team>.share``) is data, not a
decision: it steers the order the workers take jobs in and how many places
of a model's queue a team may hold, and both read it from one Redis hash
(``SHARES_KEY``) rather than asking the policy per job. Every gateway writes
that hash from the policy revision it holds: when it loads one, and again at
least every :data:`REPUBLISH_S` so a Redis that was flushed or restarted
heals without a reload. Redis being down never holds up a load: the write is
retried on the next tick. docs/architecture.md, "Publishing the shares".
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Mapping

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.policy.revision import PolicyFilesError
from workers.contract.fair_queues import SHARES_KEY, encode_name

log = logging.getLogger("govgate.policy")

#: ``SHARES_KEY``'s field for the weight of every team the policy gives no share of its own.
ANY_TEAM = "*"
#: A team's weight when neither its own entry nor ``teams.default`` gives one.
DEFAULT_SHARE = 1.0
#: A gateway writes the hash again after this long even if its revision did not change.
REPUBLISH_S = 60.0


def team_shares(data: Mapping[str, Any]) -> dict[str, float]:
    """The weights the policy's base ``data`` gives, keyed as ``SHARES_KEY`` is (encoded team names).

    ``ANY_TEAM`` holds the weight of every team without its own: the
    ``default`` entry's share (the convention of ``limits``), else 1. Only
    teams with their own share are listed. The load-time check
    (policies/checks.rego) refused anything but a number in (0, 1000]; a
    value that still is not one is skipped rather than published.
    """
    config = data.get("govgate_config")
    teams = config.get("teams") if isinstance(config, dict) else None
    teams = teams if isinstance(teams, dict) else {}
    default = _share(teams.get("default"))
    shares = {ANY_TEAM: DEFAULT_SHARE if default is None else default}
    for team, settings in teams.items():
        share = _share(settings)
        if share is not None:
            shares[encode_name(team)] = share
    return shares


def _share(settings: Any) -> float | None:
    value = settings.get("share") if isinstance(settings, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def weight_text(weight: float) -> str:
    """A weight as the hash stores it (``3``, ``0.5``): Lua's ``tonumber`` reads it back exactly."""
    return str(int(weight)) if weight == int(weight) else repr(weight)


async def publish_shares(redis: aioredis.Redis, shares: Mapping[str, float]) -> None:
    """Replace ``SHARES_KEY`` with ``shares`` in one transaction (readers never see it half written).

    Raises ``RedisError`` or ``OSError`` when Redis does not take it.
    """
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(SHARES_KEY)
        pipe.hset(SHARES_KEY, mapping={team: weight_text(weight) for team, weight in shares.items()})
        await pipe.execute()


class SharePublisher:
    """Keeps ``SHARES_KEY`` equal to the shares of the policy revision this gateway holds.

    ``policy`` is the gateway's :class:`ReloadingPolicyEngine` (anything
    with ``revision`` and ``current``); its engine's ``snapshot`` holds the
    data. A reload calls :meth:`poke` so the new weights are written at
    once; the loop otherwise looks every ``tick_s`` whether the revision
    changed, the last write failed, or :data:`REPUBLISH_S` passed.
    """

    def __init__(self, redis: aioredis.Redis, policy: Any, *, tick_s: float = 2.0,
                 republish_s: float = REPUBLISH_S) -> None:
        if tick_s <= 0 or republish_s <= 0:
            raise ValueError("tick_s and republish_s must be positive")
        self._redis = redis
        self._policy = policy
        self._tick_s = tick_s
        self._republish_s = republish_s
        self._published: str | None = None  # the revision last written
        self._published_at = float("-inf")
        self._failing = False  # the last write failed (logged once until it works again)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def published_revision(self) -> str | None:
        """The policy revision whose shares this gateway last wrote (None: none yet)."""
        return self._published

    def poke(self) -> None:
        """A policy revision was loaded: write its shares now (from the loop, never blocking the caller)."""
        self._wake.set()

    async def start(self) -> None:
        """Write the shares of the revision loaded at start (or keep retrying) and begin the loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="govgate-share-publisher")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def publish_if_due(self) -> bool:
        """Write the shares if the revision changed, the last write failed, or they are old; True if written."""
        engine = self._policy.current
        revision = engine.revision
        if revision == self._published and time.monotonic() - self._published_at < self._republish_s:
            return False
        snapshot = getattr(engine, "snapshot", None)
        if snapshot is None:  # an engine without data (a test's stand-in): nothing to publish
            return False
        try:
            shares = team_shares(snapshot.base_data())
        except PolicyFilesError as exc:  # cannot happen for a loaded policy; never publish a guess
            log.error("shares of policy revision %s unreadable: %s", revision, exc)
            return False
        try:
            await publish_shares(self._redis, shares)
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("could not publish the fair-share weights of policy revision %s (retrying every "
                            "%g s): %s: %s", revision, self._tick_s, type(exc).__name__, exc)
            self._failing = True
            return False
        if self._failing or revision != self._published:
            log.info("fair-share weights of policy revision %s published (%d teams with their own share)",
                     revision, len(shares) - 1)
        self._published, self._published_at, self._failing = revision, time.monotonic(), False
        return True

    async def _run(self) -> None:
        while True:
            try:
                await self.publish_if_due()
            except Exception:  # a bug here must not end the loop: the next tick tries again
                log.exception("publishing the fair-share weights failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self._tick_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
