"""A worker whose Redis refuses its writes stops with EX_TEMPFAIL (75), not as a crash (exit 1).

Redis refuses writes when it cannot persist (MISCONF: a full disk under its RDB or AOF), has too few
replicas (NOREPLICAS), is a replica (READONLY) or is full (OOM). The worker's consumer then meets the
refusal on its next take and Celery stops it as an "Unrecoverable error", exit 1, which ``govgate up``
counted as a crash of the model: five such exits within a minute gave the model up for good. 75 tells it
apart (``govgate/launcher.py`` waits and tries again). Real parts: a worker process and a Redis of its own,
made to refuse writes with ``min-replicas-to-write`` (no replica: the same refusal path as MISCONF).
"""

from __future__ import annotations

import os
import threading
import time

import redis

from govgate.processes import stop_process
from tests.conftest import spawn_cli, wait_for_worker
from tests.own_redis import own_redis  # noqa: F401  (fixture)
from workers.contract.registry import TINY_MODEL_NAME


def test_a_worker_whose_redis_refuses_writes_exits_with_ex_tempfail(own_redis, tmp_path) -> None:  # noqa: F811
    log = tmp_path / "worker.log"
    worker = spawn_cli(own_redis, "worker", "--model", TINY_MODEL_NAME, log=log)
    client = redis.Redis.from_url(own_redis.redis_url)
    try:
        wait_for_worker(own_redis.redis_url, TINY_MODEL_NAME, worker)
        client.config_set("min-replicas-to-write", 1)
        deadline = time.monotonic() + 120
        while worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker.poll() == os.EX_TEMPFAIL, log.read_text()[-3000:]
        last = log.read_text().strip().splitlines()[-1]
        assert "Redis refuses writes" in last and "NOREPLICAS" in last, last  # the line `govgate up` quotes
    finally:
        client.config_set("min-replicas-to-write", 0)
        client.close()
        stop_process(worker, timeout_s=10)


def test_a_control_reply_redis_refuses_ends_instead_of_retrying_forever(own_redis) -> None:  # noqa: F811
    """A worker's reply to a control command (a ping) makes a channel, which registers its owner: a write.

    kombu takes redis-py's ResponseError for an error a new connection cures and retried making that
    channel, each try keeping its connections open: here three tries then an OperationalError, on the
    worker's own connection without end, so a worker that met the refusal there (a ping that came
    before its take did) never exited (CI; 4 of 12 runs of the test above under a CPU burner).
    Real parts: the workers' Celery app on its own Redis, kombu's own mailbox reply.
    """
    from workers.contract.celery_config import make_celery
    from workers.contract.redis_refusal import RedisRefusesWrites

    app = make_celery(own_redis.redis_url, owner=f"{TINY_MODEL_NAME}.{os.getpid()}@test")
    client = redis.Redis.from_url(own_redis.redis_url)
    outcome: list[BaseException | None] = []
    try:
        with app.connection_for_write() as connection:
            node = app.control.mailbox(connection).Node("test@node", channel=connection.default_channel)
            client.config_set("min-replicas-to-write", 1)

            def reply() -> None:
                try:
                    node.reply({"test@node": {"ok": "pong"}}, exchange="reply.celery.pidbox", routing_key="r",
                               ticket="t")
                    outcome.append(None)
                except BaseException as exc:  # noqa: BLE001 - what it raised is the test's subject
                    outcome.append(exc)

            before = len(client.client_list())
            clients = []
            for _ in range(3):  # each reply meets the refusal; what it opened must not stay open
                replying = threading.Thread(target=reply, daemon=True)
                replying.start()
                replying.join(30)
                if replying.is_alive():
                    break
                clients.append(_clients_settled(client, before))
            stuck = replying.is_alive()
            client.config_set("min-replicas-to-write", 0)  # lets a stuck reply end
            replying.join(10)
        assert not stuck, "the reply was still retrying after 30 s"
        assert len(outcome) == 3 and all(isinstance(o, RedisRefusesWrites) for o in outcome), outcome
        assert str(outcome[0]).startswith("NOREPLICAS")
        # no connection left open by a failed channel (each try left 2, so a leak reads before+2, +4, +6)
        assert max(clients) <= before, (before, clients)
    finally:
        client.config_set("min-replicas-to-write", 0)
        client.close()
        app.close()


def _clients_settled(client: redis.Redis, before: int, within_s: float = 10.0) -> int:
    """The number of clients Redis lists once it has seen the closes a failed try made.

    Redis drops a closed connection from CLIENT LIST when its event loop reads the close, not when the
    client closes it, so a count taken at once can still hold a try's connections (CI read 5, 5, 3 with
    nothing leaked). A leaked connection never leaves the list: waiting tells the two apart.
    """
    deadline = time.monotonic() + within_s
    count = len(client.client_list())
    while count > before and time.monotonic() < deadline:
        time.sleep(0.1)
        count = len(client.client_list())
    return count


def test_only_a_write_refusal_counts_as_one() -> None:
    from workers.contract.redis_refusal import write_refusal

    wrapped = redis.exceptions.ResponseError("Error running script (call to f_20da): @user_script:338: "
                                             "@user_script: 338: -MISCONF Errors writing to the AOF file")
    assert write_refusal(redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots")) \
        .startswith("MISCONF")
    assert write_refusal(wrapped).startswith("MISCONF Errors writing")
    assert write_refusal(redis.exceptions.ReadOnlyError("You can't write against a read only replica.")) == \
        "READONLY You can't write against a read only replica."
    try:
        raise OSError("kombu wrapped it") from redis.exceptions.OutOfMemoryError("command not allowed")
    except OSError as exc:
        assert write_refusal(exc) == "OOM command not allowed"
    assert write_refusal(redis.exceptions.ResponseError("WRONGTYPE Operation against a key")) is None
    assert write_refusal(redis.exceptions.ConnectionError("Connection refused")) is None
    assert write_refusal(ValueError("MISCONF")) is None
    from workers.contract.redis_refusal import RedisRefusesWrites
    assert write_refusal(RedisRefusesWrites("NOREPLICAS Not enough good replicas")) == "NOREPLICAS Not enough good replicas"
