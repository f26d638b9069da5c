"""A request admitted but not yet queued holds its place in the model's queue, and gives it back on every
path that does not reach the queue (h8 finding 2).

Against a real Redis: the admit script counts the model's admitting hash
with the queue (per team in fair mode) and adds the request's place in the
step that reserves; the push moves it into the queue, an undo or a release
(a denial after the reservation, an audit append that failed, a push that
failed, a cancelled or unanswered admit's give-back) deletes it, and a dead
gateway's place stops counting after its TTL. A Redis of the module's own,
since ``SHARES_KEY`` is one key for the whole deployment.
"""

from __future__ import annotations

import calendar
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from gateway.dispatch.queue import Dispatcher, NoPlace
from gateway.limits import QueueAtLimit, Reservation, UsageCounters
from gateway.limits.admitting import ADMITTING_TTL_S, admitting_key
from gateway.limits.fair_share import team_field
from gateway.limits.queue import fair_model_queue, model_queue
from govgate.redis_server import RedisProcess
from tests.gateway.test_celery_message import _job
from workers.contract.fair_queues import SHARES_KEY, waiting_key
from workers.contract.jobs import queue_for
from workers.contract.queue_layout import queue_keys
from workers.contract.sealing import Sealer

pytestmark = pytest.mark.anyio

T = float(calendar.timegm((2024, 3, 10, 12, 0, 0)))
EVERYTHING = {"principal": {}, "team": {}}
LIMIT = 4


@pytest.fixture(scope="module")
def own_server() -> Iterator[RedisProcess]:
    folder = Path(tempfile.mkdtemp(prefix="gg-adm-"))
    server = RedisProcess.start(folder, persist=False)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def client(own_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    redis_client = aioredis.Redis.from_url(own_server.url)
    await redis_client.flushall()
    await redis_client.hset(SHARES_KEY, "*", 1)
    yield redis_client
    await redis_client.aclose()


@pytest.fixture
async def counters(client: aioredis.Redis) -> AsyncIterator[UsageCounters]:
    usage = UsageCounters(client, prefix=f"test:{uuid.uuid4().hex}")
    yield usage
    await usage.aclose()


MODEL = "adm-tiny"


async def fair(counters: UsageCounters, team: str, *, request_id: str | None = None, now: float = T,
               replace: Reservation | None = None) -> Reservation | QueueAtLimit:
    reply = await counters.admit(request_id or uuid.uuid4().hex, f"p-{team}", team, EVERYTHING, 10,
                                 queue=fair_model_queue(MODEL, team, LIMIT), replace=replace, now=now)
    assert isinstance(reply.outcome, (Reservation, QueueAtLimit)), reply.outcome
    return reply.outcome


async def fifo(counters: UsageCounters, *, now: float = T) -> Reservation | QueueAtLimit:
    reply = await counters.admit(uuid.uuid4().hex, "pat", None, EVERYTHING, 10, queue=model_queue(MODEL, 2),
                                 now=now)
    assert isinstance(reply.outcome, (Reservation, QueueAtLimit)), reply.outcome
    return reply.outcome


async def held(client: aioredis.Redis) -> set[str]:
    return {k.decode() for k in await client.hkeys(admitting_key(MODEL))}


# ---------------------------------------------------------------- counting

async def test_admitted_requests_hold_their_teams_places_before_any_is_queued(client, counters) -> None:
    heavy = [await fair(counters, "heavy") for _ in range(LIMIT)]
    assert all(isinstance(r, Reservation) for r in heavy)
    refused = await fair(counters, "heavy")
    assert isinstance(refused, QueueAtLimit) and refused.team is not None
    assert (refused.waiting, refused.team.waiting, refused.team.cap) == (LIMIT, LIMIT, LIMIT)
    # the other team holds none of its places: it is admitted up to its half, and the ceiling is far
    light = [await fair(counters, "light") for _ in range(2)]
    assert all(isinstance(r, Reservation) for r in light)
    full = await fair(counters, "light")
    assert isinstance(full, QueueAtLimit) and full.team is not None
    assert (full.team.waiting, full.team.cap, full.team.at_ceiling) == (2, 2, False)
    assert await held(client) == {r.request_id for r in heavy + light if isinstance(r, Reservation)}


async def test_fifo_counts_the_admitted_with_the_lists(client, counters) -> None:
    first, second = await fifo(counters), await fifo(counters)
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    refused = await fifo(counters)
    assert isinstance(refused, QueueAtLimit) and refused.waiting == 2


# ---------------------------------------------------------------- the push moves the place into the queue

@pytest.mark.parametrize("mode", ["fair", "fifo"])
async def test_the_push_moves_the_place_into_the_queue_counted_once(client, counters, mode) -> None:
    admit = (lambda: fair(counters, "heavy")) if mode == "fair" else (lambda: fifo(counters))
    room = LIMIT if mode == "fair" else 2
    admitted = [await admit() for _ in range(room)]
    assert all(isinstance(r, Reservation) for r in admitted)
    dispatcher = Dispatcher(client, expires_s=60, sealer=Sealer(os.urandom(32)), mode=mode)
    pushed = admitted[0]
    assert isinstance(pushed, Reservation)
    await dispatcher.enqueue(_job(pushed.request_id, MODEL, "heavy"))
    assert pushed.request_id not in await held(client) and len(await held(client)) == room - 1
    if mode == "fair":
        assert await client.hget(waiting_key(MODEL), team_field("heavy")) == b"1"
    else:
        assert sum([await client.llen(k) for k in queue_keys(queue_for(MODEL))]) == 1
    refused = await admit()  # still full: the pushed one counts in the queue now, not twice, not nowhere
    assert isinstance(refused, QueueAtLimit) and refused.waiting == room


# ---------------------------------------------------------------- the paths that never reach the queue

@pytest.mark.parametrize("give_back", ["undo", "release"])
async def test_an_undo_or_release_before_the_queue_frees_the_place(client, counters, give_back) -> None:
    """A denial after the early reservation (undo); an audit append or a push that failed (release)."""
    admitted = [await fair(counters, "heavy") for _ in range(LIMIT)]
    assert isinstance(await fair(counters, "heavy"), QueueAtLimit)
    gone = admitted[1]
    assert isinstance(gone, Reservation) and gone.admitting == admitting_key(MODEL)
    await (counters.undo(gone, now=T) if give_back == "undo" else counters.release(gone, now=T))
    assert gone.request_id not in await held(client)
    assert isinstance(await fair(counters, "heavy"), Reservation)  # its place is free again


async def test_a_settle_leaves_the_admitting_hash_alone(client, counters) -> None:
    """A settled request was queued (its push took its place back): the settle sends no HDEL."""
    admitted = await fair(counters, "heavy")
    assert isinstance(admitted, Reservation)
    await counters.settle(admitted, 5, now=T)
    assert admitted.request_id in await held(client)  # (not pushed in this test: the settle did not touch it)


async def test_a_give_back_of_an_unanswered_admit_frees_the_place_and_bars_the_late_script(client, counters) -> None:
    """The give-back a cancelled or unanswered admit leaves behind (``UsageCounters.admit``): it frees the
    place if the script ran, and its tombstone keeps a script that runs later from taking one."""
    ran = await fair(counters, "heavy", request_id="ran-first")
    assert isinstance(ran, Reservation)
    await counters._finish(ran, "undone", 0, T, bar=True)  # the give-back, as _give_back_later sends it
    assert "ran-first" not in await held(client)
    late = Reservation("runs-late", ran.scopes, 10, T, admitting_key(MODEL))
    await counters._finish(late, "undone", 0, T, bar=True)  # the give-back arrives before the script
    again = await fair(counters, "heavy", request_id="runs-late")  # the script, late: barred
    assert isinstance(again, Reservation)  # answered from its tombstone ('held'), nothing taken
    assert "runs-late" not in await held(client)
    assert (await counters.snapshot("p-heavy", "heavy", now=T))["principal"]["in_flight"] == 0


async def test_a_refused_replacement_gives_its_place_back_with_its_reservation(client, counters) -> None:
    early = await fair(counters, "heavy", request_id="early")
    assert isinstance(early, Reservation)
    await client.hset(waiting_key(MODEL), team_field("heavy"), LIMIT)  # meanwhile the team filled its places
    replaced = await fair(counters, "heavy", request_id="early", replace=early)
    assert isinstance(replaced, QueueAtLimit) and replaced.team is not None
    assert replaced.team.waiting == LIMIT  # its own place was not counted against it
    assert "early" not in await held(client)
    await client.hset(waiting_key(MODEL), team_field("heavy"), LIMIT - 1)
    kept = await fair(counters, "heavy", request_id="second")
    again = await fair(counters, "heavy", request_id="second", replace=kept)  # passes: keeps its one place
    assert isinstance(kept, Reservation) and isinstance(again, Reservation)
    assert await held(client) == {"second"}


async def test_a_dead_gateways_places_stop_counting_after_their_ttl(client, counters) -> None:
    for _ in range(LIMIT):
        assert isinstance(await fair(counters, "heavy"), Reservation)
    just_before = T + ADMITTING_TTL_S - 1
    assert isinstance(await fair(counters, "heavy", now=just_before), QueueAtLimit)
    later = T + ADMITTING_TTL_S + 1
    fresh = await fair(counters, "heavy", now=later)
    assert isinstance(fresh, Reservation)
    assert await held(client) == {fresh.request_id}  # the expired places were deleted in that same call


# ---------------------------------------------------------------- early reservations: no place until the push

async def early(counters: UsageCounters, team: str, mode: str, limit: int, *,
                now: float | None = T) -> Reservation | QueueAtLimit:
    """A reservation made before the policy decides (gateway/requests/admission.py): checked, no place taken."""
    queue = fair_model_queue(MODEL, team, limit) if mode == "fair" else model_queue(MODEL, limit)
    reply = await counters.admit(uuid.uuid4().hex, f"p-{team}", team, EVERYTHING, 10, queue=queue, place=False,
                                 now=now)
    assert isinstance(reply.outcome, (Reservation, QueueAtLimit)), reply.outcome
    return reply.outcome


@pytest.mark.parametrize("mode", ["fair", "fifo"])
async def test_an_early_reservation_takes_no_place_so_a_denied_one_keeps_none_from_others(client, counters,
                                                                                         mode) -> None:
    """Probe p2 #1: early reservations of requests the policy is deciding (and will deny) once held the
    places; at the limit the next allowed request was refused queue_full (fifo: anyone's; fair: a teammate's)."""
    deciding = [await early(counters, "heavy", mode, 1) for _ in range(3)]
    assert all(isinstance(r, Reservation) and r.admitting is None for r in deciding)
    assert await held(client) == set()
    # an allowed request, reserved after its decision: the place is there, and it takes it
    other = "heavy" if mode == "fair" else "light"
    queue = fair_model_queue(MODEL, other, 1) if mode == "fair" else model_queue(MODEL, 1)
    allowed = (await counters.admit("allowed", f"p2-{other}", other, EVERYTHING, 10, queue=queue, now=T)).outcome
    assert isinstance(allowed, Reservation) and allowed.admitting == admitting_key(MODEL)
    for denied in deciding:  # the denials: an undo gives back their tokens, and touches no place
        assert isinstance(denied, Reservation)
        await counters.undo(denied, now=T)
    assert await held(client) == {"allowed"}


def _dispatcher(client: aioredis.Redis, mode: str) -> Dispatcher:
    return Dispatcher(client, expires_s=60, sealer=Sealer(os.urandom(32)), mode=mode)


@pytest.mark.parametrize("mode, limit", [("fair", LIMIT), ("fifo", 2)])
async def test_the_push_of_early_reservations_takes_exactly_the_places_left(client, counters, mode, limit) -> None:
    """The check moved to the push keeps s46's exactness: early reservations all passed their check at once
    (none took a place), and their pushes take exactly the places there are, counting one held by a request
    admitted after its decision; the others are refused as an admission would refuse them. (The clock is
    the real one: the push reads it to know which places are live.)"""
    team = "heavy"
    queue = fair_model_queue(MODEL, team, limit) if mode == "fair" else model_queue(MODEL, limit)
    holder = (await counters.admit("holder", f"p-{team}", team, EVERYTHING, 10, queue=queue)).outcome
    assert isinstance(holder, Reservation)
    racers = [await early(counters, team, mode, limit, now=None) for _ in range(limit + 3)]
    assert all(isinstance(r, Reservation) for r in racers)
    dispatcher, pushed, refused = _dispatcher(client, mode), 0, []
    for racer in racers:
        assert isinstance(racer, Reservation)
        check = fair_model_queue(MODEL, team, limit) if mode == "fair" else model_queue(MODEL, limit)
        try:
            await dispatcher.enqueue(_job(racer.request_id, MODEL, team), check=check)
            pushed += 1
        except NoPlace as exc:
            refused.append(exc.refusal)
    assert pushed == limit - 1  # the holder's place is still its own
    assert len(refused) == 4 and all(r.waiting == limit and r.limit == limit for r in refused)
    if mode == "fair":
        assert all(r.team is not None and (r.team.waiting, r.team.cap) == (limit, limit) for r in refused)
    await dispatcher.enqueue(_job("holder", MODEL, team))  # the holder's push moves its place into the queue
    assert await held(client) == set()
    jobs = int(await client.hget(waiting_key(MODEL), team_field(team)) or 0) if mode == "fair" \
        else sum([await client.llen(k) for k in queue_keys(queue_for(MODEL))])
    assert jobs == limit


async def test_a_push_check_counts_no_expired_place(client, counters) -> None:
    """A place a dead gateway left stops counting after its TTL at the push too."""
    await client.hset(admitting_key(MODEL), "dead", f" {int((T - 1) * 1e6)}")
    await client.hset(admitting_key(MODEL), "alive", f" {int((T + 3600 * 24 * 365 * 50) * 1e6)}")
    dispatcher = _dispatcher(client, "fifo")
    await dispatcher.enqueue(_job("first", MODEL, None), check=model_queue(MODEL, 2))
    with pytest.raises(NoPlace) as caught:
        await dispatcher.enqueue(_job("second", MODEL, None), check=model_queue(MODEL, 2))
    assert caught.value.refusal.waiting == 2  # the live place and the queued job; not the dead one
