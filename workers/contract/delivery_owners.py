"""Whose unacknowledged deliveries are whose, so a dead worker's jobs go back at once.

kombu's Redis transport keeps every worker's unacknowledged deliveries in
one hash and one index (``unacked``, ``unacked_index``) that record no
owner, so when a whole worker dies nobody can tell its deliveries from a
live worker's long job: they go back to their queues only once the broker's
visibility timeout has passed (generation hard limit + 30 s: 100 s by
default). Prefork hides that for a pool process's death (its parent
requeues the job at once), not for the worker's own; with the solo pool
(``GOVGATE_WORKER_POOL=solo``) every crash is the worker's own.

So each worker keeps its deliveries under keys of its own (kombu's
``unacked_key``/``unacked_index_key`` transport options, named by the
worker's Celery node name, :func:`owner_keys`) and registers them in
:data:`OWNERS_KEY` with its host and pid. Every worker's periodic restore
(``workers/contract/kombu_redis.py``, every ~2 s) then hands back at once
all deliveries of an owner that is dead (:func:`is_dead`): on the same host,
its pid is gone (seen the moment it exits); elsewhere, it left the
heartbeat set (``workers/contract/liveness.py``, within
``HEARTBEAT_TTL_S``) and registered longer ago than that. Deliveries of live
owners still go back after the visibility timeout, as before (a worker
wedged with its process alive). A worker restarted under the same node name
(a container's pid 1 again) hands back, at its first restore, whatever its
keys held from before it started.

Keys without a registration (:func:`orphaned_nodes`) are looked for once a
minute: a worker judged dead by mistake (a host whose heartbeat stalled)
has its registration dropped, registers again at its next sweep, and if it
dies before that, its keys would name no owner and wait forever. They are
registered for the node their name gives (:func:`owner_from_node`), as of
when they were found, and from then on judged like any owner.

Since 2026-12-02 an owner's hash also holds each delivery's time
(:func:`time_field`), a field a worker from before that day would read as a
payload when it hands back a dead owner's deliveries (it decoded the time as
a message and its worker stopped with a TypeError, at its start or at its
next sweep: during a rolling upgrade one dead new worker stopped every old
one). So a registration is written in a form only a worker that knows the
time fields reads (:meth:`Owner.record`, the owner under ``"owner"``): an
older worker reads it as no owner and looks only at the owner's index, which
a new worker never writes, so it leaves a new worker's keys alone. An older
worker's registration (``host``/``pid``/``since`` at the top) is still read.

Names here are the contract between workers; the gateway reads none of them.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.contract.liveness import HEARTBEAT_TTL_S

if TYPE_CHECKING:
    import redis

#: Hash: worker node name → JSON ``{"owner": {"host", "pid", "since"}}`` (``since``: Unix seconds it registered;
#: until 2026-12-02 the three were at the top, which older workers still write and read: :meth:`Owner.parse`).
OWNERS_KEY = "govgate:unacked:owners"
#: kombu's own keys: where deliveries of workers without an owner (older versions) are kept.
LEGACY_KEYS = ("unacked", "unacked_index")
#: An owner on another host that registered less than this long ago counts as alive without a heartbeat
#: (its heartbeat starts once its consumer is ready, after it registered).
REGISTRATION_GRACE_S = HEARTBEAT_TTL_S + 30


#: The prefixes of an owner's keys (:func:`owner_keys`); the registry's own key shares the first. The
#: index is kombu's layout and no longer written for an owner (until 2026-12-02 it was): an owner's hash
#: holds each delivery's time beside its payload (:func:`time_field`), so a take writes one ``HSET`` and
#: an ack one ``HDEL`` instead of two commands each; an index left by an older worker is still read.
HASH_PREFIX, INDEX_PREFIX = "govgate:unacked:", "govgate:unacked-index:"
#: Marks an owner's hash field that holds a delivery's time (Unix seconds) rather than its payload. Delivery
#: tags are UUIDs, so no tag begins with it.
TIME_MARK = "@"
#: How often a worker looks for keys of owners nobody registered (a SCAN of the keyspace).
ORPHAN_SCAN_INTERVAL_S = 60.0


def owner_keys(node: str) -> tuple[str, str]:
    """The unacked hash and (older workers') index of the worker named ``node`` (``<model>.<pid>@<host>``)."""
    return f"{HASH_PREFIX}{node}", f"{INDEX_PREFIX}{node}"


def time_field(tag: str) -> str:
    """The field of an owner's hash that holds when ``tag`` was delivered."""
    return TIME_MARK + tag


def delivery_times(fields: dict[str, str], index: dict[str, float]) -> dict[str, float | None]:
    """Each delivery in an owner's hash (``fields``: its fields and values, decoded) → when it was delivered:
    its time field, else its entry in an older worker's ``index``, else None (its time never arrived)."""
    out: dict[str, float | None] = {}
    for name, value in fields.items():
        if name.startswith(TIME_MARK):
            continue
        raw = fields.get(time_field(name))
        try:
            out[name] = float(raw) if raw is not None else index.get(name)
        except ValueError:
            out[name] = index.get(name)
    return out


@dataclass(frozen=True)
class Owner:
    """A registered worker: its node name, host and pid, and when it registered."""

    node: str
    host: str
    pid: int
    since: float

    def record(self) -> str:
        """The registration, nested under ``"owner"``: a worker from before 2026-12-02 reads it as no owner,
        so it never hands back (reads as payloads) the time fields of this owner's hash (module docstring)."""
        return json.dumps({"owner": {"host": self.host, "pid": self.pid, "since": self.since}})

    @classmethod
    def parse(cls, node: str, raw: str | bytes) -> Owner | None:
        """The owner a registry entry names (as :meth:`record` writes it, or as an older worker wrote it,
        the fields at the top); None for an entry that cannot be read (left alone)."""
        try:
            fields = json.loads(raw)
            fields = fields.get("owner", fields)
            return cls(node, str(fields["host"]), int(fields["pid"]), float(fields["since"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def owner_from_node(node: str, now: float) -> Owner:
    """The owner a node name gives (``<model>.<pid>@<host>``), registered as of ``now``.

    A name not of that form gives no host (judged by its heartbeat, as an
    owner elsewhere is) and pid 0.
    """
    name, _, host = node.rpartition("@")
    pid_text = name.rpartition(".")[2]
    pid = int(pid_text) if pid_text.isdigit() else 0
    return Owner(node, host if name and host else "", pid, now)


def orphaned_nodes(client: redis.Redis, registered: set[str]) -> set[str]:
    """The nodes whose unacked keys exist but are not in ``registered`` (the registry's nodes)."""
    found: set[str] = set()
    for prefix in (INDEX_PREFIX, HASH_PREFIX):
        for raw in client.scan_iter(match=prefix + "*", count=1000):
            key = raw.decode() if isinstance(raw, bytes) else raw
            if key != OWNERS_KEY:
                found.add(key[len(prefix):])
    return found - registered


def this_process(node: str) -> Owner:
    """The owner record of this worker process."""
    return Owner(node, socket.gethostname(), os.getpid(), time.time())


def process_started_at(pid: int) -> float | None:
    """When the process ``pid`` on this host started (Unix seconds), None if there is none.

    Linux's ``/proc``; elsewhere only whether the pid exists is known (then: now, if it does).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as system:
            boot = next(float(line.split()[1]) for line in system if line.startswith(b"btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 (starttime), after "pid (comm)"
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError, StopIteration):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return time.time()


def is_dead(owner: Owner, live_nodes: set[str], *, host: str, now: float) -> bool:
    """Whether ``owner`` is gone, so its deliveries can be handed back now.

    On this host its process answers for it: gone the moment it exits, or
    when its pid now belongs to a process that started after it registered
    (pid reuse). Elsewhere only the heartbeat can tell (``live_nodes``: the
    worker names in it), once the registration is older than a heartbeat's
    life. A live owner's deliveries still go back after the visibility
    timeout, as kombu's always did.
    """
    if owner.host == host:
        started = process_started_at(owner.pid)
        return started is None or started > owner.since + PID_REUSE_SLACK_S
    return owner.node not in live_nodes and now - owner.since > REGISTRATION_GRACE_S


#: A process that started this much after its pid's owner registered is another process (clock ticks and
#: the registration's own delay stay well inside it).
PID_REUSE_SLACK_S = 5.0
