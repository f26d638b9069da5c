"""A dead worker's unacknowledged deliveries go back at once; a live one's only past the visibility timeout.

Real Redis, kombu channels of this transport (``workers/contract/kombu_redis.py``) with an owner each,
as workers have (``workers/contract/delivery_owners.py``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
import redis as redis_py

from tests.own_redis import module_redis_server  # noqa: F401  (fixture: see below)
from workers.contract.celery_config import make_celery
from workers.contract.delivery_owners import (OWNERS_KEY, REGISTRATION_GRACE_S, TIME_MARK, is_dead, Owner,
                                              owner_from_node, owner_keys, process_started_at, time_field)
from workers.contract.liveness import BEAT_SCRIPT, WORKERS_KEY, member

QUEUE = "model.owners-test"
# The tests' sweeps take kombu's mutex and scan the whole keyspace for owners' keys, as every worker's sweep
# does: on the session's shared Redis the session worker's sweep held the mutex at a test's first sweep under
# a loaded machine (a sweep that finds it held is skipped, silently, as kombu's is), so the orphan scan ran a
# sweep late (test-busy, session 51); its own scan could hand a test's orphan back too. Hence a module Redis.


@pytest.fixture
def client(redis_server) -> Iterator[redis_py.Redis]:
    client = redis_py.Redis.from_url(redis_server.url)
    client.delete(OWNERS_KEY, WORKERS_KEY, QUEUE)
    yield client
    client.delete(OWNERS_KEY, WORKERS_KEY, QUEUE)
    for key in client.keys("govgate:unacked*"):
        client.delete(key)
    client.close()


@contextmanager
def worker_channel(redis_server, node: str):
    """A channel as the worker named ``node`` has it (its deliveries under its own keys)."""
    app = make_celery(redis_server.url, owner=node)
    try:
        with app.connection_for_write() as connection:
            yield connection.default_channel
    finally:
        app.close()


def publish(channel, *bodies: str) -> None:
    channel.queue_declare(QUEUE)
    for body in bodies:
        channel.basic_publish(channel.prepare_message(body), "", QUEUE)


def take(channel):
    """One delivery the channel holds unacknowledged (as a worker holds the job it runs)."""
    message = channel.basic_get(QUEUE, no_ack=False)
    assert message is not None
    channel.settle_deferred()
    return message


def abandon(channel) -> None:
    """Forget the deliveries in memory, as a killed worker does: closing the channel must not hand them back."""
    channel.qos._delivered.clear()


def exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def deliveries(client, hash_key: str) -> int:
    """The deliveries an owner's hash holds (its payload fields; each has its time beside it)."""
    return sum(1 for field in client.hkeys(hash_key) if not field.startswith(TIME_MARK.encode()))


def sweep(channel) -> None:
    channel.qos.restore_visible(num=10, interval=1)


def test_a_worker_registers_and_keeps_its_deliveries_under_its_own_keys(redis_server, client):
    node = f"owned.{os.getpid()}@{socket.gethostname()}"
    with worker_channel(redis_server, node) as channel:
        publish(channel, "a")
        message = take(channel)
        hash_key, index_key = owner_keys(node)
        assert (channel.unacked_key, channel.unacked_index_key) == (hash_key, index_key)
        assert client.hget(hash_key, message.delivery_tag) is not None
        assert client.hlen("unacked") == 0  # not in kombu's shared keys
        owner = Owner.parse(node, client.hget(OWNERS_KEY, node))
        assert (owner.host, owner.pid) == (socket.gethostname(), os.getpid())
        sweep(channel)  # its own fresh delivery stays where it is
        assert client.hget(hash_key, message.delivery_tag) is not None and client.llen(QUEUE) == 0
        assert float(client.hget(hash_key, time_field(message.delivery_tag))) > time.time() - 60
        assert not client.exists(index_key)  # the time is in the hash: the take wrote one HSET, no ZADD
        message.ack()
        channel.settle_deferred()
        assert client.hlen(hash_key) == 0  # payload and time, one HDEL


def test_deliveries_an_older_worker_indexed_are_still_restored_by_their_index(redis_server, client):
    """Until 2026-12-02 an owner's delivery times were in an index (a sorted set); a live owner's
    delivery written so goes back past the visibility timeout by its index entry, a fresh one stays, and
    one whose time never arrived stays until its owner is dead, as before."""
    here = socket.gethostname()
    live = f"older.{os.getpid()}@{here}"
    with worker_channel(redis_server, live) as channel:
        publish(channel, "stale", "fresh", "untimed")
        stale, fresh, untimed = take(channel), take(channel), take(channel)
        hash_key, index_key = owner_keys(live)
        client.hdel(hash_key, *(time_field(m.delivery_tag) for m in (stale, fresh, untimed)))  # the old layout
        client.zadd(index_key, {stale.delivery_tag: 1, fresh.delivery_tag: time.time()})
        with worker_channel(redis_server, f"sweeper.{os.getpid()}@{here}") as other:
            sweep(other)
        assert client.llen(QUEUE) == 1
        assert client.hget(hash_key, stale.delivery_tag) is None and client.zscore(index_key, stale.delivery_tag) is None
        assert client.hget(hash_key, fresh.delivery_tag) is not None and client.hget(hash_key, untimed.delivery_tag)


def test_a_registration_is_one_an_older_worker_reads_as_no_owner(redis_server, client):
    """Rolling upgrade: a worker from before 2026-12-02 hands back a dead owner's deliveries by reading
    every field of its hash as a payload; a time field (``@<tag>``, a float) stopped it with a TypeError at
    its start or next sweep (seen with an old and a new worker on one Redis, the new one killed holding a
    job). It reads an owner only from ``host``, ``pid`` and ``since`` at the top of the registration, and
    an owner it cannot read it leaves alone but for the owner's index, which a worker now never writes."""
    node = f"new.{os.getpid()}@{socket.gethostname()}"
    with worker_channel(redis_server, node) as channel:
        publish(channel, "a")
        message = take(channel)
        raw = json.loads(client.hget(OWNERS_KEY, node))
        assert not {"host", "pid", "since"} & set(raw)  # an older worker's parse: KeyError, no owner
        hash_key, index_key = owner_keys(node)
        assert client.hexists(hash_key, time_field(message.delivery_tag)) and not client.exists(index_key)
        owner = Owner.parse(node, client.hget(OWNERS_KEY, node))
        assert (owner.host, owner.pid) == (socket.gethostname(), os.getpid())  # read here, as it was


def test_a_dead_owner_an_older_worker_registered_goes_back(redis_server, client):
    """A registration an older worker wrote (its fields at the top) still names its owner: a dead one's
    deliveries, indexed as an older worker indexed them, go back at the next sweep."""
    dead = f"older-dead.1@{socket.gethostname()}"
    with worker_channel(redis_server, dead) as channel:
        publish(channel, "a")
        message = take(channel)
        abandon(channel)
    hash_key, index_key = owner_keys(dead)
    client.hdel(hash_key, time_field(message.delivery_tag))  # the old layout: the time in the index
    client.zadd(index_key, {message.delivery_tag: time.time()})
    client.hset(OWNERS_KEY, dead, json.dumps({"host": socket.gethostname(), "pid": exited_pid(),
                                              "since": time.time()}))
    with worker_channel(redis_server, f"newer.{os.getpid()}@{socket.gethostname()}") as other:
        sweep(other)
    assert client.llen(QUEUE) == 1
    assert not client.exists(hash_key, index_key) and not client.hexists(OWNERS_KEY, dead)


def test_the_deliveries_of_a_worker_whose_process_is_gone_go_back_at_the_next_sweep(redis_server, client):
    dead = f"dead.1@{socket.gethostname()}"
    with worker_channel(redis_server, dead) as channel:
        publish(channel, "a", "b")
        take(channel), take(channel)
        abandon(channel)
    # the worker "died" holding both: its process is gone
    client.hset(OWNERS_KEY, dead, Owner(dead, socket.gethostname(), exited_pid(), time.time()).record())
    with worker_channel(redis_server, f"alive.{os.getpid()}@{socket.gethostname()}") as other:
        assert client.llen(QUEUE) == 0
        sweep(other)
        assert client.llen(QUEUE) == 2  # at once, not after the visibility timeout
        assert not client.exists(*owner_keys(dead)) and not client.hexists(OWNERS_KEY, dead)
        again = take(other)
        assert again.delivery_info.get("redelivered") or again.headers.get("redelivered")


def test_a_dead_owner_whose_hash_holds_only_a_stray_time_field_is_forgotten(redis_server, client):
    """A delivery's time without its payload is no delivery: the dead owner's keys and registration go."""
    dead = f"dead-stray.1@{socket.gethostname()}"
    hash_key, _ = owner_keys(dead)
    client.hset(hash_key, time_field("gone-tag"), 1)
    client.hset(OWNERS_KEY, dead, Owner(dead, socket.gethostname(), exited_pid(), time.time()).record())
    with worker_channel(redis_server, f"alive.{os.getpid()}@{socket.gethostname()}") as other:
        sweep(other)
    assert not client.exists(hash_key) and not client.hexists(OWNERS_KEY, dead)
    assert client.llen(QUEUE) == 0


def test_a_job_whose_take_ran_but_whose_worker_never_read_it_goes_back_once_the_worker_is_dead(redis_server, client):
    """The window kombu's BRPOP left open: Redis hands a worker its job and the worker dies before it reads
    the reply. The take removes the job from its list and writes it to the worker's hash in one step, so
    it is already where the restore looks: once the worker is dead the next sweep puts it back."""
    from workers.contract import take as take_script

    take_script.load_script(client)  # a worker's first take loads it (NOSCRIPT); this one is never read
    dead = f"dead-take.1@{socket.gethostname()}"
    with worker_channel(redis_server, dead) as channel:
        publish(channel, "a")
        channel.basic_consume(QUEUE, no_ack=False, callback=lambda message: None, consumer_tag="never-read")
        channel.connection.cycle._register_BRPOP(channel)  # the take goes out; its reply is never read
        hash_key, index_key = owner_keys(dead)
        deadline = time.monotonic() + 10
        while client.llen(QUEUE) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.llen(QUEUE) == 0 and deliveries(client, hash_key) == 1 and not client.exists(index_key)
        assert not channel.qos._delivered  # the channel never saw it
    client.hset(OWNERS_KEY, dead, Owner(dead, socket.gethostname(), exited_pid(), time.time()).record())
    with worker_channel(redis_server, f"alive.{os.getpid()}@{socket.gethostname()}") as other:
        sweep(other)
        assert client.llen(QUEUE) == 1 and not client.exists(hash_key, index_key)
        again = take(other)
        assert again.body == b"a" and (again.delivery_info.get("redelivered") or again.headers.get("redelivered"))
        again.ack()


def test_a_job_whose_take_reply_was_lost_goes_back_before_the_next_take(redis_server, client):
    """The connection drops after Redis ran a take and before its reply was read: the job is in the live
    worker's hash but was never delivered. Before its next take the channel hands back what its hash
    holds and it did not deliver, so the job is served now, not after the visibility timeout."""
    import socket as socket_mod

    from workers.contract import take as take_script
    from workers.contract.queue_layout import bell_key, idle_key, queue_keys

    node = f"lost-reply.{os.getpid()}@{socket.gethostname()}"
    with worker_channel(redis_server, node) as channel:
        publish(channel, "a")
        hash_key, index_key = owner_keys(node)
        spec = [take_script.TakeQueue(idle_key(QUEUE), bell_key(QUEUE), queue_keys(QUEUE), "owners-test")]
        assert take_script.take(client, hash_key, index_key, spec).item  # Redis ran it; the reply is "lost"
        assert client.llen(QUEUE) == 0 and deliveries(client, hash_key) == 1
        channel._lost_take = True  # as the connection error reading the take's reply leaves it
        got: list = []
        channel.basic_consume(QUEUE, no_ack=False, callback=got.append, consumer_tag="lost-reply")
        for _ in range(10):
            try:
                channel.connection.client.drain_events(timeout=0.5)
            except socket_mod.timeout:
                pass
            if got:
                break
        assert [m.body for m in got] == [b"a"] and deliveries(client, hash_key) == 1  # taken again, once
        got[0].ack()
        channel.settle_deferred()
        # The ack's removal rides on the next take, sent on the channel's connection and not read back
        # here: Redis may run this client's HLEN first (make test read 2, the tag and its time, once).
        deadline = time.monotonic() + 5
        while client.hlen(hash_key) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.hlen(hash_key) == 0 and client.llen(QUEUE) == 0
        channel.basic_cancel("lost-reply")
        client.delete(idle_key(QUEUE), bell_key(QUEUE))


def test_a_served_delivery_whose_removal_waits_for_a_take_is_not_handed_back_after_a_lost_take(redis_server, client):
    """An ack's removal rides on the next take; when that take's reply is lost, the channel hands back what
    its hash holds and it did not deliver. A delivery it served and acknowledged is among those (its removal
    not yet run) and must not go back to the queue to run again: its bookkeeping is removed instead."""
    from kombu.utils.json import loads

    from workers.contract import take as take_script
    from workers.contract.queue_layout import bell_key, idle_key, queue_keys

    node = f"acked-lost.{os.getpid()}@{socket.gethostname()}"
    with worker_channel(redis_server, node) as channel:
        publish(channel, "served", "lost")
        hash_key, index_key = owner_keys(node)
        spec = [take_script.TakeQueue(idle_key(QUEUE), bell_key(QUEUE), queue_keys(QUEUE), "owners-test")]
        served = take_script.take(client, hash_key, None, spec)  # an owner's layout: times in the hash
        lost = take_script.take(client, hash_key, None, spec)  # Redis ran it; the reply is "lost"
        assert served.item and lost.item and client.llen(QUEUE) == 0 and deliveries(client, hash_key) == 2
        tag = loads(served.item)["properties"]["delivery_tag"]
        # as after the served job's ack whose take (carrying the removal) failed on the connection
        channel._acked_out = [tag]
        channel._lost_take = True
        channel._restore_undelivered()
        assert client.llen(QUEUE) == 1  # the lost one only
        back = take(channel)
        assert back.body == b"lost"
        back.ack()
        channel.settle_deferred()
    # the channel closed: the served delivery's removal, which no take carried, went then
    assert client.hlen(hash_key) == 0 and client.zcard(index_key) == 0 and client.llen(QUEUE) == 0
    client.delete(idle_key(QUEUE), bell_key(QUEUE))


def test_a_live_workers_deliveries_go_back_only_past_the_visibility_timeout(redis_server, client):
    here = socket.gethostname()
    live = f"live.{os.getpid()}@{here}"
    with worker_channel(redis_server, live) as channel:
        publish(channel, "fresh", "stale")
        fresh, stale = take(channel), take(channel)
        hash_key, index_key = owner_keys(live)
        client.hset(hash_key, time_field(stale.delivery_tag), 1)  # delivered long ago
        with worker_channel(redis_server, f"sweeper.{os.getpid()}@{here}") as other:
            sweep(other)
        assert client.llen(QUEUE) == 1  # the stale one only
        assert client.hget(hash_key, fresh.delivery_tag) is not None
        assert client.hget(hash_key, stale.delivery_tag) is None


@pytest.mark.parametrize("beating, registered_ago, gone", [
    (True, REGISTRATION_GRACE_S * 2, False),     # in the heartbeat set: alive
    (False, 1.0, False),                         # just registered, no heartbeat yet: alive
    (False, REGISTRATION_GRACE_S * 2, True),     # silent and old: gone
])
def test_a_worker_on_another_host_is_judged_by_its_heartbeat(redis_server, client, beating, registered_ago, gone):
    node = "remote.7@elsewhere"
    with worker_channel(redis_server, f"holder.{os.getpid()}@{socket.gethostname()}") as holder:
        publish(holder, "a")
        message = take(holder)
        # move the delivery into the remote worker's keys, as if it had taken it
        payload = client.hget(holder.unacked_key, message.delivery_tag)
        client.hdel(holder.unacked_key, message.delivery_tag, time_field(message.delivery_tag))
        hash_key, _ = owner_keys(node)
        client.hset(hash_key, mapping={message.delivery_tag: payload, time_field(message.delivery_tag): time.time()})
        client.hset(OWNERS_KEY, node, Owner(node, "elsewhere", 7, time.time() - registered_ago).record())
        abandon(holder)
        if beating:
            client.eval(BEAT_SCRIPT, 1, WORKERS_KEY, member("remote", node), 15)
        sweep(holder)
        assert client.llen(QUEUE) == (1 if gone else 0)
        assert client.hexists(OWNERS_KEY, node) == (not gone)


def test_a_worker_restarted_under_its_name_hands_back_what_its_keys_held(redis_server, client):
    node = f"same.{os.getpid()}@{socket.gethostname()}"
    hash_key, index_key = owner_keys(node)
    with worker_channel(redis_server, node) as first:
        publish(first, "a")
        take(first)
        abandon(first)
    # its predecessor of the same name (a container's pid 1 again) registered before this process started
    client.hset(OWNERS_KEY, node, Owner(node, socket.gethostname(), os.getpid(),
                                        process_started_at(os.getpid()) - 60).record())
    with worker_channel(redis_server, node) as second:
        assert Owner.parse(node, client.hget(OWNERS_KEY, node)).since > time.time() - 30  # registered anew
        publish(second, "b")
        mine = take(second)
        sweep(second)
        assert client.llen(QUEUE) == 1  # the predecessor's "a", not its own "b"
        assert client.hget(hash_key, mine.delivery_tag) is not None


def test_a_worker_restarted_under_its_name_hands_back_what_an_older_version_held(redis_server, client):
    """Rolling upgrade in place (a container's pid 1 again, now the new version): the predecessor, a worker
    from before 2026-12-02, registered at the top level and indexed its delivery's time; the new process
    registers anew in its own form and hands the delivery back at its first sweep."""
    node = f"inplace.{os.getpid()}@{socket.gethostname()}"
    hash_key, index_key = owner_keys(node)
    with worker_channel(redis_server, node) as first:
        publish(first, "a")
        held = take(first)
        abandon(first)
    client.hdel(hash_key, time_field(held.delivery_tag))  # the older layout: time in the index
    client.zadd(index_key, {held.delivery_tag: time.time() - 120})
    client.hset(OWNERS_KEY, node, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                              "since": process_started_at(os.getpid()) - 60}))
    with worker_channel(redis_server, node) as second:
        assert "owner" in json.loads(client.hget(OWNERS_KEY, node))  # registered anew, in its own form
        sweep(second)
        assert client.llen(QUEUE) == 1 and client.hget(hash_key, held.delivery_tag) is None
        assert not client.exists(index_key)


def test_a_pid_now_used_by_a_later_process_counts_as_gone():
    here = socket.gethostname()
    me = Owner("w.1@" + here, here, os.getpid(), time.time())
    assert not is_dead(me, set(), host=here, now=time.time())
    before_me = Owner("w.1@" + here, here, os.getpid(), process_started_at(os.getpid()) - 60)
    assert is_dead(before_me, set(), host=here, now=time.time())
    assert is_dead(Owner("w.2@" + here, here, exited_pid(), time.time()), set(), host=here, now=time.time())


def test_a_worker_whose_registration_was_lost_registers_again_at_its_next_sweep(redis_server, client):
    node = f"relost.{os.getpid()}@{socket.gethostname()}"
    with worker_channel(redis_server, node) as channel:
        publish(channel, "a")
        message = take(channel)
        client.delete(OWNERS_KEY)  # as after a Redis restart that kept the queues but not the registry
        client.hset(owner_keys(node)[0], time_field(message.delivery_tag), 1)  # delivered long ago
        sweep(channel)
        assert client.hexists(OWNERS_KEY, node)
        assert client.llen(QUEUE) == 1  # its own stale delivery went back, as kombu's would


def test_a_dead_workers_payload_without_its_index_entry_goes_back_too(redis_server, client):
    dead = f"halfway.1@{socket.gethostname()}"
    with worker_channel(redis_server, dead) as channel:
        publish(channel, "a")
        message = take(channel)
        abandon(channel)
    client.zrem(owner_keys(dead)[1], message.delivery_tag)  # it died between the payload and its index entry
    client.hset(OWNERS_KEY, dead, Owner(dead, socket.gethostname(), exited_pid(), time.time()).record())
    with worker_channel(redis_server, f"finder.{os.getpid()}@{socket.gethostname()}") as other:
        sweep(other)
    assert client.llen(QUEUE) == 1 and not client.hexists(OWNERS_KEY, dead)


def died_unregistered(redis_server, client, node: str) -> None:
    """The worker ``node`` took a job and died holding it, its registration gone (dropped by a sweep that
    judged it dead by mistake, before it registered again)."""
    with worker_channel(redis_server, node) as channel:
        publish(channel, "a")
        take(channel)
        abandon(channel)
    client.hdel(OWNERS_KEY, node)


def test_keys_of_a_dead_worker_nobody_registered_are_found_and_handed_back(redis_server, client):
    """A worker judged dead by mistake lost its registration, took a job, and died before it registered
    again: its keys name no owner. The next sweep finds them (a SCAN), registers them for the node their
    name gives, and, that node's process being gone, hands the delivery back at once."""
    orphan = f"orphan.{exited_pid()}@{socket.gethostname()}"
    died_unregistered(redis_server, client, orphan)
    with worker_channel(redis_server, f"finder.{os.getpid()}@{socket.gethostname()}") as other:
        sweep(other)
        assert client.llen(QUEUE) == 1  # back at once: the process the name gives is gone
        assert not client.exists(*owner_keys(orphan)) and not client.hexists(OWNERS_KEY, orphan)


def test_keys_of_a_live_worker_found_without_registration_stay_with_it(redis_server, client):
    """The same for a worker still running (its pid alive): registered for it as its name gives, and its
    delivery left alone."""
    here = socket.gethostname()
    live = f"stray.{os.getpid()}@{here}"
    with worker_channel(redis_server, live) as channel:
        publish(channel, "a")
        message = take(channel)
        client.hdel(OWNERS_KEY, live)
        with worker_channel(redis_server, f"finder.{os.getpid()}@{here}") as other:
            sweep(other)
        found = Owner.parse(live, client.hget(OWNERS_KEY, live))
        assert (found.host, found.pid) == (here, os.getpid())
        assert client.llen(QUEUE) == 0 and client.hget(owner_keys(live)[0], message.delivery_tag) is not None


def test_the_orphan_scan_runs_once_a_minute_not_every_sweep(redis_server, client):
    here = socket.gethostname()
    with worker_channel(redis_server, f"scanner.{os.getpid()}@{here}") as channel:
        sweep(channel)  # the first sweep scans
        orphan = f"late.{exited_pid()}@{here}"
        died_unregistered(redis_server, client, orphan)
        sweep(channel)
        assert client.llen(QUEUE) == 0 and client.exists(*owner_keys(orphan))  # not looked for again yet
        channel.qos._next_orphan_scan = 0.0  # a minute later
        sweep(channel)
        assert client.llen(QUEUE) == 1 and not client.exists(*owner_keys(orphan))


@pytest.mark.parametrize("node, host, pid", [("tiny.42@box", "box", 42), ("a.b.7@h.example", "h.example", 7),
                                              ("no-at-sign", "", 0), ("model.x@box", "box", 0),
                                              ("@box", "", 0)])
def test_the_owner_a_node_name_gives(node, host, pid):
    owner = owner_from_node(node, 12.5)
    assert (owner.node, owner.host, owner.pid, owner.since) == (node, host, pid, 12.5)
