"""A fair job's start gives way to a fairer job pushed after its take (``workers/contract/repick.py``).

Real Redis, the real transport channel under a worker's own keys, the gateway's real push script and the
job channel's real start claim: the handler below is what the solo pool's task does inside the delivery.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest
import redis as redis_py

from gateway.dispatch.celery_message import queue_key, task_message
from tests.loopback_proxy import ReplyDropper
from workers.contract.celery_config import make_celery
from workers.contract.fair_queues import (encode_name, fair_queue, registry_key, tags_key, waiting_key,
                                          wake_key)
from tests.redis_monitor import CommandLog
from workers.contract.jobs import JOB_LOOK_AGAIN, JOB_STARTED, cancel_key
from workers.contract.repick import GAVE_WAY_FIELD, START_SHA, PutBack, load_script, ticket_for
from workers.contract.sealing import Sealer
from workers.streams import RedisJobChannel

SEALER = Sealer(os.urandom(32))


@contextmanager
def fair_model(redis_server) -> Iterator[tuple[str, redis_py.Redis, Any]]:
    """A model of its own, a client, and a channel as a worker has it (deliveries under its own keys)."""
    model = f"repick-{uuid.uuid4().hex[:8]}"
    node = f"repick-worker-{uuid.uuid4().hex[:6]}@test"
    client = redis_py.Redis.from_url(redis_server.url)
    app = make_celery(redis_server.url, owner=node, give_way=True)
    try:
        with app.connection_for_write() as connection:
            yield model, client, connection
    finally:
        client.delete(*client.keys(f"model.{model}*"), registry_key(model), tags_key(model), waiting_key(model),
                      wake_key(model), *client.keys("govgate:job:rp-*"))
        client.close()
        app.close()


def push(redis_server, model: str, team: str, principal: str, request_id: str, *, priority: int = 5) -> str:
    """The gateway's fair push of one job (its real script), as ``request_id``."""
    import redis.asyncio as aioredis

    from gateway.dispatch.fair_push import fair_push

    queue = fair_queue(model, team, principal)
    key, message = task_message("govgate.noop", request_id, [], queue=queue, priority=priority, argsrepr="()")

    async def run() -> None:
        async_client = aioredis.Redis.from_url(redis_server.url)
        try:
            await fair_push(async_client, model, encode_name(team), key, message)
        finally:
            await async_client.aclose()

    asyncio.run(run())
    return key


def withdraw(redis_server, client, model: str, key: str, team: str) -> None:
    """The gateway's withdrawal of the job at the head of ``key`` (its client went away before it was taken)."""
    import redis.asyncio as aioredis

    from gateway.dispatch.queue import WITHDRAW

    message = client.lindex(key, -1).decode()

    async def run() -> None:
        async_client = aioredis.Redis.from_url(redis_server.url)
        try:
            assert await WITHDRAW(async_client, (key, waiting_key(model)), (message, team))
        finally:
            await async_client.aclose()

    asyncio.run(run())


def consume(connection, model: str, count: int, handle: Callable[[Any], None]) -> None:
    """Consume the model's queue until ``handle`` was called ``count`` times (each call acks its message)."""
    import socket

    calls: list[int] = []
    channel = connection.default_channel

    def callback(message: Any) -> None:
        calls.append(1)
        handle(message)

    channel.basic_consume(f"model.{model}", no_ack=False, callback=callback, consumer_tag="repick-test")
    for _ in range(count * 4):
        if len(calls) >= count:
            break
        try:
            connection.drain_events(timeout=2)
        except socket.timeout:
            pass
    channel.basic_cancel("repick-test")
    assert len(calls) == count, calls


def start(client, message) -> str:
    """The job's start claim as the task makes it; "gave way", "first run" or "again"."""
    request_id = message.headers["id"]
    job = RedisJobChannel(client, request_id, streaming=False, sealer=SEALER, ticket=ticket_for(request_id))
    try:
        return "first run" if job.claim_start() else "again"
    except PutBack:
        return "gave way"


def starts_behind_a_backlog(redis_server, model: str, client, connection, count: int,
                            at_a2: Callable[[Any], None], *, a2_client=None,
                            after_a2: Callable[[], None] | None = None) -> list[tuple[str, str]]:
    """Team a's four jobs pushed, then the model consumed until ``count`` starts, each made as the task makes
    it and acked: (request id, outcome) in order. ``at_a2(message)`` runs once, when a's third job is
    delivered (taken, not started): a's first two make its tags real (the first is the warm-up). That start
    goes through ``a2_client`` when given (else ``client``), and ``after_a2()`` runs right after it."""
    for i in range(4):
        push(redis_server, model, "a", "ann", f"rp-a{i}")
    order: list[tuple[str, str]] = []

    def handle(message) -> None:
        request_id = message.headers["id"]
        if request_id == "rp-a2" and not order[2:]:
            at_a2(message)
            order.append((request_id, start(a2_client or client, message)))
            if after_a2 is not None:
                after_a2()
        else:
            order.append((request_id, start(client, message)))
        message.ack()

    consume(connection, model, count, handle)
    return order


def sent_for(log: CommandLog, request_id: str) -> list[str]:
    """The commands clients sent naming ``request_id`` (its state key) or the look again's script."""
    return [words[0] for words in log.sent if any(request_id in word or START_SHA in word for word in words[1:])]


def tags(client, model: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(tags_key(model)).items()}


def test_a_job_pushed_after_the_take_of_another_teams_job_runs_first(redis_server):
    """Team a has a backlog and has had jobs; b pushes one job while a's next job is taken but not
    started: that job gives way (back at the head of its list, its charge undone, its bookkeeping gone)
    and b's runs next. (a's first job is the channel's warm-up and costs a nothing: until a second one is
    measured, a and b tie and a goes first by name.)"""
    with fair_model(redis_server, ) as (model, client, connection):
        for i in range(4):
            push(redis_server, model, "a", "ann", f"rp-a{i}")
        channel = connection.default_channel
        order: list[tuple[str, str]] = []
        seen: dict[str, Any] = {}

        def handle(message) -> None:
            request_id = message.headers["id"]
            if request_id == "rp-a2" and "taken" not in seen:
                seen["taken"] = tags(client, model)  # a2 charged
                push(redis_server, model, "b", "bob", "rp-b0")  # in the window between take and start
                seen["mark"] = client.get(cancel_key("rp-a2"))
                load_script(client)  # as an earlier start of the worker did (counted: its EVALSHA alone)
                with CommandLog(redis_server.url) as log:
                    outcome = start(client, message)
                seen["sent"] = sent_for(log, "rp-a2")
            else:
                outcome = start(client, message)
            order.append((request_id, outcome))
            if outcome == "gave way":
                # what Redis holds the moment it went back: a's job at the head of its list, nothing of it
                # in the worker's hash, a counted waiting again
                seen["head"] = client.lindex(queue_key(fair_queue(model, "a", "ann"), 5), -1)
                seen["hash"] = client.hkeys(channel.unacked_key)
                seen["waiting"] = {k.decode(): int(v) for k, v in client.hgetall(waiting_key(model)).items()}
                seen["after"] = tags(client, model)
                seen["state"] = client.get(cancel_key("rp-a2"))
            time.sleep(0.005)
            message.ack()

        consume(connection, model, 6, handle)
        assert order == [("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-a2", "gave way"),
                         ("rp-b0", "first run"), ("rp-a2", "first run"), ("rp-a3", "first run")], order
        assert seen["head"] is not None and b'"rp-a2"' in seen["head"]
        # the push marked the taken job; its claim read the mark and only then ran the look again, which
        # undid the claim: the job has not started
        assert seen["mark"] == JOB_LOOK_AGAIN
        assert seen["sent"] == ["set", "evalsha"], seen["sent"]
        assert seen["state"] is None
        assert seen["hash"] == []
        assert seen["waiting"] == {"a": 2, "b": 1}
        # a's charge is undone: its tags are back where the take found them, less nothing more
        taken, after = seen["taken"], seen["after"]
        charged = float(taken["svc"])
        assert float(after["t:a"]) == pytest.approx(float(taken["t:a"]) - charged)
        assert float(after["p:a/ann"]) == pytest.approx(float(taken["p:a/ann"]) - charged)
        assert float(after["V"]) <= float(taken["V"])
        assert int(after[GAVE_WAY_FIELD]) == 1
        assert tags(client, model)[GAVE_WAY_FIELD] == "1"
        assert client.get(cancel_key("rp-a2")) == JOB_STARTED
        assert not client.hgetall(waiting_key(model))
        assert client.hlen(channel.unacked_key) == 0 or _emptied(client, channel.unacked_key)


def _emptied(client, key: str) -> bool:
    for _ in range(100):
        if client.hlen(key) == 0:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("case", ["nothing pushed", "same team", "another take since", "bookkeeping gone"])
def test_a_start_keeps_its_job_when_nothing_fairer_arrived(redis_server, case):
    """No list turned non-empty, only a list of the same team (another principal, same priority), another
    worker's take or correction moved the tags since, or the job's bookkeeping was restored meanwhile:
    the start claims its job as before and nothing is put back."""
    with fair_model(redis_server) as (model, client, connection):
        for i in range(4):
            push(redis_server, model, "a", "ann", f"rp-a{i}")
        channel = connection.default_channel
        order: list[tuple[str, str]] = []

        def handle(message) -> None:
            request_id = message.headers["id"]
            if request_id == "rp-a2":  # as in the test above, where it gives way
                if case == "same team":
                    push(redis_server, model, "a", "amy", "rp-x0")
                elif case == "another take since":
                    push(redis_server, model, "b", "bob", "rp-x0")
                    client.hincrby(tags_key(model), "cs", 1)  # as another worker's take writes it
                elif case == "bookkeeping gone":
                    push(redis_server, model, "b", "bob", "rp-x0")
                    client.hdel(channel.unacked_key, message.delivery_tag)  # restored by a sweep, say
            order.append((request_id, start(client, message)))
            message.ack()

        consume(connection, model, 4 if case == "nothing pushed" else 5, handle)
        assert order[:3] == [("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-a2", "first run")], order
        assert all(outcome == "first run" for _, outcome in order), order
        assert GAVE_WAY_FIELD not in tags(client, model)
        ran = sorted(request_id for request_id, _ in order)
        assert len(ran) == len(set(ran)), ran  # nothing ran twice


def test_a_job_whose_list_left_the_registry_since_its_take_does_not_give_way(redis_server):
    """Two workers on one model: this one takes the last job of a list busy for more than five minutes
    (the registry's time of it is that old), and before its start another worker's take finds every list
    empty and recounts, which drops the emptied list from the registry; then another team's job arrives.
    Put back on that unregistered list, the job would wait where no take looks (until a push of the same
    team, principal and priority registered it again): the start claims it instead."""
    from workers.contract import take as take_script
    from workers.contract.queue_layout import bell_key, idle_key

    with fair_model(redis_server) as (model, client, connection):
        for i in range(2):
            push(redis_server, model, "a", "ann", f"rp-a{i}")
        listed = queue_key(fair_queue(model, "a", "ann"), 5)
        client.zadd(registry_key(model), {listed: time.time() - 400})  # its last registration: long ago
        queue = f"model.{model}"
        other = f"govgate:unacked:repick-other-{uuid.uuid4().hex[:6]}"
        order: list[tuple[str, str]] = []
        seen: dict[str, Any] = {}

        def handle(message) -> None:
            request_id = message.headers["id"]
            if request_id == "rp-a1" and "pruned" not in seen:
                client.hset(tags_key(model), "rc", 0)  # the other worker's take recounts (once a second)
                nothing = take_script.take(client, other, None,
                                           [take_script.TakeQueue(idle_key(queue), bell_key(queue), [], model)])
                seen["pruned"] = nothing is None and client.zscore(registry_key(model), listed) is None
                push(redis_server, model, "b", "bob", "rp-b0")
            order.append((request_id, start(client, message)))
            message.ack()

        try:
            consume(connection, model, 3, handle)
        finally:
            client.delete(idle_key(queue), bell_key(queue), other)
        assert seen["pruned"]
        assert sorted(order) == [("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-b0", "first run")], order
        assert client.llen(listed) == 0  # nothing left where no take looks
        assert GAVE_WAY_FIELD not in tags(client, model)


def test_the_first_job_run_is_the_warm_up_also_when_the_first_taken_gave_way(redis_server):
    """The channel's first fair job carries the process's warm-up and is not measured (no team pays for
    it). When that first job gives way, the job run in its place is the first one run: it is the one not
    measured, so the model's mean service time (``svc``) is still unknown at the next take."""
    with fair_model(redis_server) as (model, client, connection):
        for i in range(2):
            push(redis_server, model, "b", "bob", f"rp-b{i}")
        order: list[tuple[str, str]] = []
        svc_known: list[bool] = []

        def handle(message) -> None:
            request_id = message.headers["id"]
            if not order:  # b0, the channel's first: a (first by name while the tags tie) arrives meanwhile
                push(redis_server, model, "a", "ann", "rp-a0")
            svc_known.append("svc" in tags(client, model))
            order.append((request_id, start(client, message)))
            message.ack()

        consume(connection, model, 4, handle)
        assert order == [("rp-b0", "gave way"), ("rp-a0", "first run"), ("rp-b0", "first run"),
                         ("rp-b1", "first run")], order
        # a0's correction (applied by the take of b0) measured nothing; b0's (applied by b1's) did
        assert svc_known == [False, False, False, True], svc_known


@pytest.mark.parametrize("fairer", [True, False])
def test_a_start_whose_reply_was_lost_tells_a_job_put_back_from_one_not(redis_server, fairer):
    """The connection drops after Redis ran the start's script (the look again, after a claim that read the
    look-again mark) and before its reply was read (the worker's client does not send a command again). Had
    the job given way, it is back on its list and must not be answered failed (it would run again later,
    for nobody, and its ack would correct a charge undone): the start finds its bookkeeping gone and reports
    it put back. Had it not (the job that marked it withdrawn before the start: nothing fairer waits), the
    error stands, as a lost reply to the plain claim's SET did."""
    with fair_model(redis_server) as (model, client, connection):
        for i in range(4):
            push(redis_server, model, "a", "ann", f"rp-a{i}")
        proxy = ReplyDropper(redis_server.url.split("//", 1)[1].split("?", 1)[0], START_SHA.encode())
        db = redis_server.url.rsplit("db=", 1)[1]
        lossy = redis_py.Redis.from_url(f"redis://127.0.0.1:{proxy.port}/{db}", socket_timeout=5,
                                        socket_connect_timeout=5)  # as the worker makes its client
        order: list[tuple[str, str]] = []

        def handle(message) -> None:
            request_id = message.headers["id"]
            if request_id == "rp-a2" and proxy.armed:
                b0 = push(redis_server, model, "b", "bob", "rp-b0")  # marks a2
                if not fairer:
                    withdraw(redis_server, client, model, b0, "b")
                try:
                    outcome = start(lossy, message)
                except redis_py.ConnectionError:
                    outcome = "failed"
            else:
                outcome = start(client, message)
            order.append((request_id, outcome))
            message.ack()

        try:
            consume(connection, model, 6 if fairer else 4, handle)
        finally:
            lossy.close()
            proxy.close()
        assert proxy.dropped
        if fairer:
            assert order == [("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-a2", "gave way"),
                             ("rp-b0", "first run"), ("rp-a2", "first run"), ("rp-a3", "first run")], order
            assert tags(client, model)[GAVE_WAY_FIELD] == "1"
        else:
            assert order == [("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-a2", "failed"),
                             ("rp-a3", "first run")], order
            assert client.get(cancel_key("rp-a2")) == JOB_STARTED  # the claim stands; the look's reply was lost


def test_a_job_taken_again_by_a_lost_take_after_it_gave_way_goes_back_before_the_next_take(redis_server):
    """A job gives way; the fairer job is withdrawn (its client left) before this worker's next take, which
    takes the same job again, same delivery tag, and its reply is lost (the connection dropped after Redis
    ran it). Before the next take the channel hands back what its hash holds and it did not deliver: the
    job's earlier delivery, acknowledged when it gave way, does not count as delivered, so it goes back
    now and is served, not after the visibility timeout."""
    from workers.contract import take as take_script
    from workers.contract.queue_layout import bell_key, idle_key

    with fair_model(redis_server) as (model, client, connection):
        for i in range(4):
            push(redis_server, model, "a", "ann", f"rp-a{i}")
        channel = connection.default_channel
        queue = f"model.{model}"
        order: list[tuple[str, str]] = []

        def handle(message) -> None:
            request_id = message.headers["id"]
            if request_id == "rp-a2" and not order[2:]:
                b0 = push(redis_server, model, "b", "bob", "rp-b0")
                order.append((request_id, start(client, message)))
                assert order[-1] == (request_id, "gave way")
                withdraw(redis_server, client, model, b0, "b")  # its client went away
                # the next take, whose reply is lost: Redis ran it, a2 is in the hash again, undelivered
                again = take_script.take(client, channel.unacked_key, None,
                                         [take_script.TakeQueue(idle_key(queue), bell_key(queue), [], model)])
                assert again is not None and b'"rp-a2"' in again.item.encode()
                channel._lost_take = True  # as the connection error reading the take's reply leaves it
            else:
                order.append((request_id, start(client, message)))
            message.ack()

        consume(connection, model, 5, handle)
        assert sorted(order) == [("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-a2", "first run"),
                                 ("rp-a2", "gave way"), ("rp-a3", "first run")], order
        assert _emptied(client, channel.unacked_key)


@pytest.mark.parametrize("priority, gives_way", [(0, True), (9, False)])
def test_a_more_urgent_job_of_the_same_principal_makes_a_start_give_way_a_less_urgent_one_not(
        redis_server, priority, gives_way):
    """Inside a team the take orders by priority first (0 most urgent): a job of the taken job's own
    principal pushed after the take at a more urgent priority is what the take would have chosen, so the
    start gives way to it; one at a less urgent priority is not."""
    with fair_model(redis_server) as (model, client, connection):
        order = starts_behind_a_backlog(
            redis_server, model, client, connection, 6 if gives_way else 5,
            lambda message: push(redis_server, model, "a", "ann", "rp-x0", priority=priority))
        if gives_way:
            assert order[2:4] == [("rp-a2", "gave way"), ("rp-x0", "first run")], order
        else:
            assert order[2:] == [("rp-a2", "first run"), ("rp-a3", "first run"), ("rp-x0", "first run")], order


def test_a_job_cancelled_while_queued_ends_at_its_start_rather_than_give_way(redis_server):
    """The client of the taken job left (the gateway's withdrawal found it taken and set the cancel key):
    its start claims it, sees the cancel and ends it now, freeing its request's slot, instead of putting
    it back to wait for its turn again while a fairer job arrived."""
    with fair_model(redis_server) as (model, client, connection):
        def cancelled(message) -> None:
            client.set(cancel_key("rp-a2"), b"1", ex=60)  # the gateway's cancel request
            push(redis_server, model, "b", "bob", "rp-b0")

        order = starts_behind_a_backlog(redis_server, model, client, connection, 5, cancelled)
        assert order[2] == ("rp-a2", "again"), order  # claimed: the cancel seen (not a first run)
        assert sorted(order) == sorted([("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-a2", "again"),
                                        ("rp-b0", "first run"), ("rp-a3", "first run")]), order
        assert client.get(cancel_key("rp-a2")) == b"1"  # kept for a redelivery
        assert GAVE_WAY_FIELD not in tags(client, model)


def test_a_start_after_a_script_flush_loads_its_script_and_still_gives_way(redis_server):
    """SCRIPT FLUSH (or a Redis that restarted with its data) between the take and the start: the start's
    EVALSHA answers NOSCRIPT, the script is loaded and the start runs, giving way as it would have."""
    with fair_model(redis_server) as (model, client, connection):
        def flushed(message) -> None:
            push(redis_server, model, "b", "bob", "rp-b0")
            client.script_flush()

        order = starts_behind_a_backlog(redis_server, model, client, connection, 6, flushed)
        assert order[2:4] == [("rp-a2", "gave way"), ("rp-b0", "first run")], order
        assert sorted(order[4:]) == [("rp-a2", "first run"), ("rp-a3", "first run")], order


def test_a_job_that_gave_way_is_not_read_as_served_from_the_workers_log(tmp_path):
    """The tests' reading of a worker's order (``served_in_order``): a job that gave way logs that, then a
    success line for a task that ran nothing; only its later run is a job served."""
    from tests.conftest import served_in_order

    log = tmp_path / "worker.log"
    log.write_text("[INFO] Task govgate.generate[aa01] succeeded in 0.003s\n"
                   "[INFO] request bb02 gave way to a fairer job: back at the head of its queue\n"
                   "[INFO] Task govgate.generate[bb02] succeeded in 0.001s\n"
                   "[INFO] Task govgate.generate[cc03] succeeded in 0.003s\n"
                   "[INFO] Task govgate.generate[bb02] succeeded in 0.003s\n")
    assert served_in_order(log) == ["aa01", "cc03", "bb02"]


def test_a_refusal_inside_the_start_script_is_raised_as_the_plain_claim_raised_it():
    """A full or read-only Redis refuses the script's first write, and Redis wraps the refusal in the script's
    error (with its line number); the worker's failure then names it as for the plain claim's ``SET``
    (tests/e2e/test_full_redis.py has the full Redis for real). Other errors stay as they came."""
    from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

    from workers.contract.repick import _unwrapped

    oom = _unwrapped(ResponseError("Error running script (call to f_9e29): @user_script:221: @user_script: 221: "
                                   "-OOM command not allowed when used memory > 'maxmemory'."))
    assert type(oom) is OutOfMemoryError and str(oom) == "command not allowed when used memory > 'maxmemory'."
    read_only = _unwrapped(ResponseError("Error running script (call to f_1): @user_script:9: @user_script: 9: "
                                         "-READONLY You can't write against a read only replica."))
    assert type(read_only) is ReadOnlyError
    other = ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    assert _unwrapped(other) is other


@pytest.mark.parametrize("case", ["nothing pushed", "same team"])
def test_a_start_with_no_mark_sends_the_claims_set_alone(redis_server, case):
    """No list turned non-empty after the take, or only a list that could not come before the taken one (the
    same team at the same priority: the push marks nothing): the start is the plain claim's one ``SET … GET``,
    no script (the look again costs nothing until a push marks the job)."""
    with fair_model(redis_server) as (model, client, connection):
        logs: list[CommandLog] = []

        def at_a2(message) -> None:
            if case == "same team":
                push(redis_server, model, "a", "amy", "rp-x0")
            logs.append(CommandLog(redis_server.url).__enter__())

        order = starts_behind_a_backlog(redis_server, model, client, connection, 3, at_a2)
        logs[0].__exit__(None, None, None)
        assert order == [("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-a2", "first run")], order
        assert client.get(cancel_key("rp-a2")) == JOB_STARTED
        sent = sent_for(logs[0], "rp-a2")
        assert sent == ["set"], sent
        assert logs[0].count("set", cancel_key("rp-a2"), JOB_STARTED.decode()) == 1
        assert GAVE_WAY_FIELD not in tags(client, model)


def test_a_marked_job_that_finds_nothing_fairer_at_its_start_is_claimed(redis_server):
    """Another team's job arrives after the take (the push marks the taken job) and is withdrawn before the
    start (its client left): the claim reads the mark, the look again finds no fairer job waiting and the
    claim stands: a first run, started, nothing put back."""
    with fair_model(redis_server) as (model, client, connection):
        seen: dict[str, Any] = {}

        def at_a2(message) -> None:
            b0 = push(redis_server, model, "b", "bob", "rp-b0")
            seen["mark"] = client.get(cancel_key("rp-a2"))
            withdraw(redis_server, client, model, b0, "b")
            load_script(client)
            seen["log"] = CommandLog(redis_server.url).__enter__()

        order = starts_behind_a_backlog(redis_server, model, client, connection, 4, at_a2)
        seen["log"].__exit__(None, None, None)
        assert seen["mark"] == JOB_LOOK_AGAIN
        assert order == [("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-a2", "first run"),
                         ("rp-a3", "first run")], order
        assert sent_for(seen["log"], "rp-a2") == ["set", "evalsha"]
        assert client.get(cancel_key("rp-a2")) == JOB_STARTED
        assert GAVE_WAY_FIELD not in tags(client, model)


class _CancelAfterClaim(redis_py.Redis):
    """A worker's client after whose claim of ``request_id`` (its ``SET … GET``) the gateway's cancel lands
    (written on another connection), before the start's next command."""

    request_id = ""
    canceller: redis_py.Redis

    def set(self, name, value, *args, **kwargs):  # type: ignore[override]
        was = super().set(name, value, *args, **kwargs)
        if kwargs.get("get") and name == cancel_key(self.request_id):
            self.canceller.set(name, b"1", ex=60)  # the gateway's cancel request
        return was


@pytest.mark.parametrize("when", ["before the claim", "after the claim"])
def test_a_marked_job_cancelled_before_its_look_again_ends_as_cancelled(redis_server, when):
    """A push marks the taken job (a fairer job waits), then its client leaves and the gateway writes the
    cancel over the mark, before the start's claim (which reads the cancel: no look again) or between the
    claim and the look again (which sees the cancel and leaves the claim standing): either way the job
    is not put back but claimed and seen cancelled, as without the mark, and the cancel is kept."""
    with fair_model(redis_server) as (model, client, connection):
        worker = _CancelAfterClaim.from_url(redis_server.url)
        worker.canceller = client
        seen: dict[str, Any] = {}

        def at_a2(message) -> None:
            push(redis_server, model, "b", "bob", "rp-b0")
            seen["mark"] = client.get(cancel_key("rp-a2"))
            if when == "before the claim":
                client.set(cancel_key("rp-a2"), b"1", ex=60)
            else:
                worker.request_id = "rp-a2"
            load_script(client)
            seen["log"] = CommandLog(redis_server.url).__enter__()

        try:
            order = starts_behind_a_backlog(redis_server, model, client, connection, 5, at_a2, a2_client=worker,
                                            after_a2=lambda: seen["log"].__exit__(None, None, None))
        finally:
            worker.close()
        assert seen["mark"] == JOB_LOOK_AGAIN
        assert order[2] == ("rp-a2", "again"), order  # claimed: the cancel seen (not a first run)
        assert sorted(order) == sorted([("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-a2", "again"),
                                        ("rp-b0", "first run"), ("rp-a3", "first run")]), order
        # the claim, (the cancel,) the look again only after a claim that read the mark, the cancel written back
        sent = sent_for(seen["log"], "rp-a2")
        assert sent == (["set", "set"] if when == "before the claim" else ["set", "set", "evalsha", "set"]), sent
        assert client.get(cancel_key("rp-a2")) == b"1"  # kept for a redelivery
        assert GAVE_WAY_FIELD not in tags(client, model)


def test_a_push_after_the_start_leaves_the_started_job_alone(redis_server):
    """The take noted the job; it started; then another team's job turns a list non-empty. The push's mark
    is written only where nothing is (``SET NX``): the started job's state stays ``started`` (a redelivery
    still reads it as begun), its cancel look sees no cancel, and the push's job runs next as it would."""
    with fair_model(redis_server) as (model, client, connection):
        for i in range(3):
            push(redis_server, model, "a", "ann", f"rp-a{i}")
        order: list[tuple[str, str]] = []
        seen: dict[str, Any] = {}

        def handle(message) -> None:
            request_id = message.headers["id"]
            job = RedisJobChannel(client, request_id, streaming=False, sealer=SEALER, ticket=ticket_for(request_id))
            order.append((request_id, "first run" if job.claim_start() else "again"))
            if request_id == "rp-a1" and "noted" not in seen:
                seen["noted"] = tags(client, model).get("tk", "")
                push(redis_server, model, "b", "bob", "rp-b0")  # while a1 runs
                seen["state"] = client.get(cancel_key("rp-a1"))
                assert job.cancel_requested() is False  # the look with the claim
                time.sleep(0.06)  # past the interval between two looks
                seen["cancelled"] = job.cancel_requested()
            message.ack()

        consume(connection, model, 4, handle)
        assert " rp-a1 a 5" in seen["noted"], seen["noted"]
        assert seen["state"] == JOB_STARTED
        assert seen["cancelled"] is False
        assert order == [("rp-a0", "first run"), ("rp-a1", "first run"), ("rp-b0", "first run"),
                         ("rp-a2", "first run")], order
        assert GAVE_WAY_FIELD not in tags(client, model)


@pytest.mark.parametrize("ticket", [False, True])
def test_a_mark_reads_as_a_job_not_started_and_not_cancelled(redis_server, ticket):
    """A start that cannot give way (a prefork pool, ``GOVGATE_FAIR_GIVE_WAY=0``: no ticket) reads the mark as
    a first run, not as a cancel or a redelivery; and a mark found by the cancel look (which no push writes
    over a claim, but a state key may hold) is no cancel. With a ticket and nothing else in Redis to go by
    (no tags: the look again finds no list turned non-empty), the same."""
    client = redis_py.Redis.from_url(redis_server.url)
    request_id = f"rp-{uuid.uuid4().hex[:8]}"
    try:
        client.set(cancel_key(request_id), JOB_LOOK_AGAIN, ex=60)
        model = f"repick-{uuid.uuid4().hex[:8]}"
        give_way = None
        if ticket:
            from workers.contract.repick import Ticket
            give_way = Ticket(request_id, "tag", "@tag", "govgate:unacked:none", model,
                              f"model.{model}/a/ann:5", "{}", "1 1 0 0 0 0", lambda: None)
        job = RedisJobChannel(client, request_id, streaming=True, sealer=SEALER, ticket=give_way)
        assert job.claim_start() is True
        assert job.cancel_requested() is False
        assert client.get(cancel_key(request_id)) == JOB_STARTED
        client.set(cancel_key(request_id), JOB_LOOK_AGAIN, ex=60)
        time.sleep(0.06)
        assert job.cancel_requested() is False
        assert job.stopped_by_rules() is False
    finally:
        client.delete(cancel_key(request_id))
        client.close()


def test_the_take_notes_each_workers_last_fair_job_the_latest_few(redis_server):
    """The take notes the fair job it charged under its worker's name (one entry per worker, replaced at its
    next take, dropped by a take that takes none of the model's), the latest :data:`MAX_NOTED` kept; a take
    without a name notes nothing."""
    from workers.contract import take as take_script
    from workers.contract.queue_layout import bell_key, idle_key

    model = f"repick-{uuid.uuid4().hex[:8]}"
    queue = f"model.{model}"
    client = redis_py.Redis.from_url(redis_server.url)
    spec = [take_script.TakeQueue(idle_key(queue), bell_key(queue), [], model)]
    hashes = [f"govgate:unacked:repick-{uuid.uuid4().hex[:6]}" for _ in range(take_script.MAX_NOTED + 2)]

    def noted() -> list[str]:
        raw = (client.hget(tags_key(model), "tk") or b"").decode().split()
        return [" ".join(raw[i:i + 4]) for i in range(0, len(raw), 4)]

    try:
        for i in range(take_script.MAX_NOTED + 3):
            push(redis_server, model, "a", "ann", f"rp-n{i}")
        # worker 0 takes twice: its entry is replaced, not added
        for n in range(2):
            assert take_script.take(client, hashes[0], None, spec, noted_as="w0") is not None
        assert len(noted()) == 1 and noted()[0].startswith("w0 ")
        for i in range(1, len(hashes)):
            if i == len(hashes) - 1:  # b's job, which the take chooses before a's next (b is behind)
                push(redis_server, model, "b", "bob", "rp-m0", priority=3)
            assert take_script.take(client, hashes[i], None, spec, noted_as=f"w{i}") is not None
        entries = noted()
        assert len(entries) == take_script.MAX_NOTED
        assert [e.split()[0] for e in entries] == [f"w{i}" for i in range(len(hashes) - take_script.MAX_NOTED,
                                                                           len(hashes))]
        # the request id, and the team and priority of the list the job came from
        assert all(e.split()[1].startswith("rp-n") and e.split()[2:] == ["a", "5"] for e in entries[:-1]), entries
        assert entries[-1] == f"w{len(hashes) - 1} rp-m0 b 3", entries
        before = noted()
        assert take_script.take(client, hashes[0], None, spec) is not None  # no name: nothing noted
        assert noted() == before
        last = f"w{len(hashes) - 1}"
        while take_script.take(client, hashes[-1], None, spec, noted_as=last) is not None:
            pass
        assert last not in [e.split()[0] for e in noted()]  # a take that found nothing dropped its entry
    finally:
        client.delete(*client.keys(f"model.{model}*"), registry_key(model), tags_key(model), waiting_key(model),
                      wake_key(model), idle_key(queue), bell_key(queue), *hashes, *client.keys("govgate:job:rp-*"))
        client.close()
