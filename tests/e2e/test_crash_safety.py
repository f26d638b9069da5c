"""Queues under faults: killed worker processes, time limits. Every request ends exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from govgate.processes import stop_process
from tests.conftest import CRASH_MODEL, LIMITED_MODEL, bearer, served_in_order, spawn_cli, wait_for_worker
from workers.contract.jobs import CANCEL_KEY_PREFIX, JOB_STARTED, runs_key


def pool_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


@pytest.fixture(scope="module")
def crash_worker(settings):
    """A worker on Celery's prefork pool: the tests kill its pool process, which it replaces."""
    process = spawn_cli(settings.with_(worker_pool="prefork"), "worker", "--model", CRASH_MODEL,
                        log=settings.var_dir / "crash-worker.log")
    wait_for_worker(settings.redis_url, CRASH_MODEL, process)
    yield process
    stop_process(process, timeout_s=30)


@pytest.fixture(scope="module", params=["solo", "prefork"])
def limited_worker(settings, request):
    """A worker with a 0.3 s generation time limit, on each pool: Celery keeps prefork's, the worker solo's."""
    limited = settings.with_(generation_time_limit_s=0.3, worker_pool=request.param)
    process = spawn_cli(limited, "worker", "--model", LIMITED_MODEL,
                        log=settings.var_dir / f"limited-worker-{request.param}.log")
    wait_for_worker(settings.redis_url, LIMITED_MODEL, process)
    yield process
    stop_process(process, timeout_s=30)


def started_jobs(client: redis.Redis) -> set[bytes]:
    """The job keys (``govgate:job:<request id>``) whose generation has begun."""
    return {key for key in client.keys(CANCEL_KEY_PREFIX + "*") if client.get(key) == JOB_STARTED}


def wait_for_a_generation(redis_url: str, timeout_s: float = 30) -> str | None:
    """The request id of the next generation that begins (its job key set to ``started``), or None."""
    client = redis.Redis.from_url(redis_url)
    before = started_jobs(client)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = started_jobs(client) - before
        if started:
            return started.pop().decode().rsplit(":", 1)[1]
        time.sleep(0.01)
    return None


def kill_pool_process_once_generating(settings, worker, found: dict) -> None:
    """Wait until a generation has begun in the worker's pool process, then SIGKILL that process."""
    request_id = wait_for_a_generation(settings.redis_url)
    if request_id is None:
        return
    time.sleep(0.2)  # well inside a ~1 s generation
    victim = pool_children(worker.pid)[0]
    os.kill(victim, signal.SIGKILL)
    found["victim"] = victim
    found["request_id"] = request_id


def test_killed_pool_process_is_redelivered_and_the_request_ends_once(settings, served_api, crash_worker,
                                                                     keyring, audit_store):
    found: dict = {}
    killer = threading.Thread(target=kill_pool_process_once_generating, args=(settings, crash_worker, found))
    killer.start()
    response = httpx.post(f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=120,
                          json={"model": CRASH_MODEL, "prompt": "Tell", "max_tokens": 4000, "temperature": 0})
    killer.join()
    assert found.get("victim"), "the generation was never seen starting"
    assert response.status_code == 200, response.text
    request_id = response.headers["x-govgate-request-id"]
    assert request_id == found["request_id"]
    assert response.json()["usage"]["completion_tokens"] == 4000
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "completion"]  # redelivered, generated once more, ended once
    assert entries[1].body["worker"]["pid"] != found["victim"]
    assert crash_worker.poll() is None  # the worker itself survived and replaced its pool process


def test_a_stream_whose_worker_dies_ends_with_an_error_not_a_repeat(settings, served_api, crash_worker,
                                                                   keyring, audit_store):
    found: dict = {}
    killer = threading.Thread(target=kill_pool_process_once_generating, args=(settings, crash_worker, found))
    killer.start()
    events = []
    with httpx.stream("POST", f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=120,
                      json={"model": CRASH_MODEL, "prompt": "Tell", "max_tokens": 4000, "temperature": 0,
                            "stream": True}) as response:
        request_id = response.headers["x-govgate-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    killer.join()
    assert found.get("request_id") == request_id
    assert "error" in events[-1] and events[-1]["error"]["code"] == "worker_lost"
    assert "a retry may succeed" in events[-1]["error"]["message"]  # its worker died once: not "do not retry"
    delivered = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert delivered  # the client saw part of the first run before it died
    terminal = audit_store.terminal_for(request_id)
    assert terminal.kind == "failed" and terminal.body["error"]["code"] == "worker_lost"
    # The audit holds what the first run generated; the client got its start, the output rules' hold-back
    # kept the rest (README, "Output rules on the request path").
    assert terminal.payload["output"].startswith(delivered)
    # that entry cannot say what the client received; the gateway's delivered entry does (and nothing is repeated)
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "failed", "delivered"]
    assert entries[-1].body["terminal_seq"] == terminal.seq and entries[-1].payload["client_output"] == delivered


def test_generation_time_limit_gives_504_and_a_timed_out_entry(served_api, limited_worker, keyring, audit_store):
    before = audit_store.head().seq
    # Asked as OpenAI's client asks, with its default two retries of a 5xx: the gateway tells it not to
    # (the same request would run into the same limit, charged each time), and it asks once.
    client = openai.OpenAI(base_url=f"{served_api}/v1", api_key=keyring["admin"], timeout=120)
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=LIMITED_MODEL, prompt="Tell", max_tokens=4000, temperature=0)
    client.close()
    response = refused.value.response
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timed_out"
    assert response.headers["x-should-retry"] == "false"
    assert [e.kind for e in audit_store.tail(10) if e.seq > before] == ["request", "timed_out"]
    entry = audit_store.tail(1)[0]
    assert entry.kind == "timed_out" and entry.model == LIMITED_MODEL
    assert 0 < entry.body["usage"]["completion_tokens"] < 4000  # stopped part-way, partial output kept
    assert entry.payload["output"]
    # The limit ended the job, not the worker: it serves the next one.
    assert limited_worker.poll() is None
    after = httpx.post(f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=120,
                       json={"model": LIMITED_MODEL, "prompt": "Tell", "max_tokens": 4, "temperature": 0})
    assert after.status_code == 200, after.text


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_whole_worker_killed_mid_generation_is_rescued_by_another(settings, served_api, keyring, audit_store,
                                                                    pool):
    """The unacknowledged task of a dead worker goes to another as soon as a worker sees it dead.

    Each worker keeps its deliveries under keys of its own (workers/contract/delivery_owners.py); a
    worker's periodic restore hands back a dead one's at once. With the default limits the visibility
    timeout is 100 s and the gateway's request timeout here 60 s: a 200 means the task went back
    because its worker was seen dead, not because the timeout passed.
    """
    from tests.conftest import RESCUE_MODEL
    from workers.contract.queue_layout import visibility_timeout_s

    own = settings.with_(worker_pool=pool)  # under solo the killed worker is the process generating
    assert own.request_timeout_s < visibility_timeout_s(own.generation_time_limit_s, own.redelivery_margin_s)
    first = spawn_cli(own, "worker", "--model", RESCUE_MODEL, log=settings.var_dir / "rescue-1.log")
    wait_for_worker(settings.redis_url, RESCUE_MODEL, first)
    second = None
    found: dict = {}

    def kill_the_whole_worker() -> None:
        request_id = wait_for_a_generation(settings.redis_url)
        if request_id is None:
            return
        found["request_id"] = request_id
        children = pool_children(first.pid)
        os.kill(first.pid, signal.SIGKILL)  # the worker and its pool process die at once,
        for child in children:                # with no chance to hand the task back
            os.kill(child, signal.SIGKILL)
        found["dead"] = [first.pid, *children]

    killer = threading.Thread(target=kill_the_whole_worker)
    try:
        killer.start()
        outcome: dict = {}

        def ask() -> None:
            outcome["response"] = httpx.post(
                f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=120,
                json={"model": RESCUE_MODEL, "prompt": "Tell", "max_tokens": 1000, "temperature": 0})

        asker = threading.Thread(target=ask)
        asker.start()
        killer.join()
        assert found.get("request_id"), "the generation was never seen starting"
        first.wait(10)
        second = spawn_cli(own, "worker", "--model", RESCUE_MODEL, log=settings.var_dir / "rescue-2.log")
        asker.join(110)
        response = outcome["response"]
    finally:
        for process in (first, second):
            if process is not None:
                stop_process(process, timeout_s=30)
    assert response.status_code == 200, response.text
    assert response.headers["x-govgate-request-id"] == found["request_id"]
    entries = audit_store.entries_for(found["request_id"])
    assert [e.kind for e in entries] == ["request", "completion"]
    assert entries[1].body["worker"]["pid"] not in found["dead"]  # generated again, by the next worker


def test_a_job_that_ends_its_worker_twice_is_recorded_failed_and_the_next_worker_serves_on(
        settings, served_api, keyring, audit_store):
    """A prompt that crashes the model's backend would end every worker that takes its job, and `govgate up`
    would restart the worker until it gave the model up. Here each of the job's first two runs is ended by
    SIGKILL as soon as its generation begins (the crash, injected); the third worker to take the job records
    it ``failed``/``worker_lost`` without running it, the client gets a 502, and that worker serves on."""
    from tests.conftest import RESCUE_MODEL

    own = settings.with_(worker_pool="solo")  # the killed worker is the process generating
    client = redis.Redis.from_url(settings.redis_url)
    workers: list = []
    outcome: dict = {}
    found: dict = {}

    def spawn(n: int):
        process = spawn_cli(own, "worker", "--model", RESCUE_MODEL, log=settings.var_dir / f"poison-{n}.log")
        workers.append(process)
        return process

    def ask() -> None:
        """As OpenAI's client asks, with its default retries: a retried 502 would run the job again."""
        client = openai.OpenAI(base_url=f"{served_api}/v1", api_key=keyring["admin"], timeout=120)
        try:
            outcome["response"] = client.completions.with_raw_response.create(
                model=RESCUE_MODEL, prompt="Tell", max_tokens=4000, temperature=0).http_response
        except openai.APIStatusError as refused:
            outcome["response"] = refused.response
        finally:
            client.close()

    def kill_each_run_as_it_begins() -> None:
        """Run 1 shows by its state key ("started"), run 2 by its count (it counts itself just before it
        generates); each worker is killed at once, well inside a ~1 s generation."""
        request_id = wait_for_a_generation(settings.redis_url)
        if request_id is None:
            return
        found["request_id"] = request_id
        os.kill(workers[0].pid, signal.SIGKILL)
        found["killed"] = 1
        deadline = time.monotonic() + 60
        while client.get(runs_key(request_id)) != b"1":
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
        os.kill(workers[1].pid, signal.SIGKILL)
        found["killed"] = 2

    try:
        first = spawn(1)
        wait_for_worker(settings.redis_url, RESCUE_MODEL, first)
        killer = threading.Thread(target=kill_each_run_as_it_begins)
        killer.start()
        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 60
        while found.get("killed") != 1:
            assert killer.is_alive() and time.monotonic() < deadline, "the generation was never seen starting"
            time.sleep(0.01)
        first.wait(10)
        second = spawn(2)  # takes the job back once it sees the first dead
        killer.join(70)
        assert found.get("killed") == 2, "the job was never run a second time"
        second.wait(10)
        third = spawn(3)
        wait_for_worker(settings.redis_url, RESCUE_MODEL, third)
        asker.join(110)
        response = outcome["response"]
        request_id = found["request_id"]
        after = httpx.post(f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                           json={"model": RESCUE_MODEL, "prompt": "Tell", "max_tokens": 4, "temperature": 0})
        assert third.poll() is None  # the third worker did not run the job: it is alive
    finally:
        for process in workers:
            stop_process(process, timeout_s=30)
        client.close()
    assert response.status_code == 502, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "worker_lost", error  # the client's message is the gateway's generic one
    # OpenAI's client retries a 502 twice by default, each retry a new job that would end two more workers:
    # told not to, it did not (the retry would have been served by the third worker, and answered 200)
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-govgate-request-id"] == request_id
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "failed"]
    assert entries[1].body["error"]["code"] == "worker_lost"
    assert "2 earlier runs never finished (their worker died or stalled)" in entries[1].body["error"]["message"]
    assert entries[1].body["worker"]["pid"] == third.pid
    assert after.status_code == 200, after.text  # the model is still served


def test_higher_priority_requests_are_served_first(settings, keyring, tmp_path):
    """The policy's priority obligation orders a model's queue (0 first, Celery-on-Redis); in fair mode
    it orders a team's queue, so both principals are of one team here (tests/e2e/test_fair_share.py
    holds that it never jumps another team's share)."""
    from gateway.auth import KeyStore
    from gateway.components import open_database
    from tests.conftest import PRIORITY_MODEL, policy_copy, serving
    from tests.gateway.test_fail_closed import queued

    def batch_role(config: dict) -> None:
        config["roles"]["batch"] = {"models": ["*"], "priority": 9}
        config["roles"]["admin"]["priority"] = 0
        config["limits"] = {"principals": {"default": {}}, "teams": {"default": {}}}

    own = settings.with_(policy_dir=policy_copy(tmp_path, batch_role))
    store = KeyStore(open_database(own))
    batch_key = store.create("bart", team="ops", roles=["batch"]).secret  # the admin's team
    store.engine.dispose()
    worker = None
    ids: dict[str, str] = {}
    askers = []

    def wait_queued(count: int) -> None:
        deadline = time.monotonic() + 30
        while queued(own, PRIORITY_MODEL) < count:
            assert time.monotonic() < deadline, f"never saw {count} waiting requests"
            time.sleep(0.02)

    with serving(own, tmp_path / "serve.log") as base:
        def ask(label: str, key: str) -> None:
            response = httpx.post(f"{base}/v1/completions", headers=bearer(key), timeout=120,
                                  json={"model": PRIORITY_MODEL, "prompt": label, "max_tokens": 2})
            assert response.status_code == 200, response.text
            ids[label] = response.headers["x-govgate-request-id"]

        try:
            for n, (label, key) in enumerate([("batch-0", batch_key), ("batch-1", batch_key),
                                              ("batch-2", batch_key), ("urgent", keyring["admin"])]):
                askers.append(threading.Thread(target=ask, args=(label, key)))
                askers[-1].start()
                wait_queued(n + 1)  # low priority first, the urgent request last
            worker = spawn_cli(own, "worker", "--model", PRIORITY_MODEL, log=tmp_path / "worker.log")
            for thread in askers:
                thread.join(120)
        finally:
            if worker is not None:
                stop_process(worker, timeout_s=30)
    assert len(ids) == 4
    # The worker's order, from its own log (tests/conftest.py, served_in_order).
    label_of = {request_id: label for label, request_id in ids.items()}
    order = [label_of[r] for r in served_in_order(tmp_path / "worker.log") if r in label_of]
    assert sorted(order) == sorted(ids)
    assert order[0] == "urgent", order


def _blocked_after(client: redis.Redis, first_id: int) -> list[int]:
    """Ids of the connections opened after ``first_id`` that are blocked in a BRPOP now."""
    return [int(c["id"]) for c in client.client_list()
            if int(c["id"]) > first_id and c["cmd"] == "brpop" and "b" in c["flags"]]


def _stop_while_blocked(client: redis.Redis, process, first_id: int) -> int:
    """SIGSTOP ``process`` at a moment its BRPOP is out and blocked (it re-sends one a second, so a stop
    between two is seen and tried again); the id of that connection."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        blocked = _blocked_after(client, first_id)
        if len(blocked) == 1:
            os.kill(process.pid, signal.SIGSTOP)
            if _blocked_after(client, first_id) == blocked:
                return blocked[0]
            os.kill(process.pid, signal.SIGCONT)  # its BRPOP ended between the two looks
        time.sleep(0.01)
    raise AssertionError("the worker was never seen blocked in a BRPOP")


def test_a_worker_frozen_and_killed_as_it_is_handed_a_job_loses_it_not(settings, served_api, keyring,
                                                                       audit_store):
    """The window kombu's BRPOP left: Redis hands the job to a worker whose process is frozen (SIGSTOP), so
    its unacked bookkeeping, which followed from the client, is never written; the worker is then killed.
    With BRPOP the job was then in no Redis structure and the request ended ``gateway_lost`` minutes later.
    Now a waiting worker blocks on a bell, not on the job lists: the push's ring goes to the frozen worker,
    the job stays on its list, and the next worker runs it; the request ends once, completed."""
    from tests.conftest import RESCUE_MODEL

    own = settings.with_(worker_pool="solo")
    client = redis.Redis.from_url(settings.redis_url)
    workers: list = []
    outcome: dict = {}

    def ask() -> None:
        outcome["response"] = httpx.post(
            f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=120,
            json={"model": RESCUE_MODEL, "prompt": "Tell", "max_tokens": 4, "temperature": 0})

    asker = threading.Thread(target=ask)
    try:
        before = client.client_id()
        workers.append(spawn_cli(own, "worker", "--model", RESCUE_MODEL, log=settings.var_dir / "frozen-1.log"))
        wait_for_worker(settings.redis_url, RESCUE_MODEL, workers[0])
        ask()  # served as usual: the principal's fair list is registered, the worker knows it
        assert outcome.pop("response").status_code == 200
        waiting = _stop_while_blocked(client, workers[0], before)
        asker.start()
        deadline = time.monotonic() + 30
        while waiting in _blocked_after(client, before):  # Redis answers the frozen worker's BRPOP
            assert time.monotonic() < deadline, "the push never reached the frozen worker's BRPOP"
            time.sleep(0.01)
        os.kill(workers[0].pid, signal.SIGKILL)
        workers[0].wait(10)
        queued = [k for k in client.keys(f"model.{RESCUE_MODEL}*") if client.type(k) == b"list" and client.llen(k)]
        assert queued, "the job left its list with the frozen worker"
        workers.append(spawn_cli(own, "worker", "--model", RESCUE_MODEL, log=settings.var_dir / "frozen-2.log"))
        asker.join(110)
        response = outcome["response"]
    finally:
        for process in workers:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
            stop_process(process, timeout_s=30)
        client.close()
    assert response.status_code == 200, response.text
    entries = audit_store.entries_for(response.headers["x-govgate-request-id"])
    assert [e.kind for e in entries] == ["request", "completion"]  # run once, by the next worker, ended once
    assert entries[1].body["worker"]["pid"] == workers[1].pid

