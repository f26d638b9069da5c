"""Fair share end to end: a served gateway in fair mode, a real worker, the order the audit log shows.

Team alpha queues its jobs first, team beta after; only then does a worker
(one pool process) start, so every job waits and the order it serves them
in is the schedule. With concurrency 1 the terminal entries' sequence
numbers are that order. Each test has a Redis of its own: its queues hold
only its jobs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest
import redis

from gateway.auth import KeyStore
from gateway.components import open_database
from govgate.processes import stop_process
from tests.conftest import bearer, policy_copy, served_in_order, serving, spawn_cli, wait_for_worker
from tests.e2e.test_crash_safety import pool_children, wait_for_a_generation
from tests.e2e.test_terminal_recovery import wait_terminals
from tests.gateway.test_fail_closed import queued
from tests.own_redis import own_redis  # noqa: F401 - fixture
from tests.workers.contract.test_fair_order import assert_shares_held
from workers.contract.fair_queues import SHARES_KEY, job_queue, registry_key, waiting_key
from workers.contract.registry import TINY_MODEL_NAME


def log_tail(path, chars: int = 6000) -> str:
    """The end of a child's log, for an assertion's message (the tiny model's outputs are not secrets)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(unreadable: {exc})"


def fair_settings(own_redis, tmp_path, shares: dict[str, int]):
    """Fair mode, the suite's roomy limits, and the teams' shares in the policy data."""
    def with_shares(config: dict) -> None:
        roomy = {"requests_per_minute": 100000, "tokens_per_minute": 10**9, "tokens_per_day": 10**10,
                 "tokens_per_month": None, "in_flight": 1000}
        config["limits"] = {"principals": {"default": roomy}, "teams": {"default": roomy}}
        for team, share in shares.items():
            config["teams"][team] = {"share": share}

    return own_redis.with_(queue_mode="fair", policy_dir=policy_copy(tmp_path, with_shares), request_timeout_s=90)


def make_keys(settings, users: dict[str, str]) -> dict[str, str]:
    engine = open_database(settings)
    try:
        store = KeyStore(engine)
        return {user: store.create(user, team=team, roles=["admin"]).secret for user, team in users.items()}
    finally:
        engine.dispose()


@pytest.mark.parametrize("shares, counts", [({"alpha": 1, "beta": 1}, {"alpha": 8, "beta": 6}),
                                            ({"alpha": 3, "beta": 1}, {"alpha": 12, "beta": 6})])
def test_a_worker_serves_teams_by_their_shares_not_by_arrival(own_redis, tmp_path, shares, counts):
    own = fair_settings(own_redis, tmp_path, shares)
    tag = os.urandom(3).hex()
    users = {f"{team}-{tag}": team for team in counts}
    keys = make_keys(own, users)
    served: dict[str, str] = {}  # request id → team
    failures: list[str] = []
    askers: list[threading.Thread] = []
    worker = None
    with serving(own, tmp_path / "serve.log") as base:
        def ask(user: str, n: int) -> None:
            response = httpx.post(f"{base}/v1/completions", headers=bearer(keys[user]), timeout=120,
                                  json={"model": TINY_MODEL_NAME, "prompt": f"fair {n}", "max_tokens": 128})
            if response.status_code != 200:
                failures.append(response.text)
                return
            served[response.headers["x-govgate-request-id"]] = users[user]

        try:
            total = 0
            for user, team in users.items():  # alpha's whole burst first, then beta's
                for n in range(counts[team]):
                    askers.append(threading.Thread(target=ask, args=(user, n)))
                    askers[-1].start()
                total += counts[team]
                deadline = time.monotonic() + 30
                while queued(own, TINY_MODEL_NAME) < total:
                    assert not failures, failures
                    assert time.monotonic() < deadline, f"never saw {total} waiting requests"
                    time.sleep(0.05)
            client = redis.Redis.from_url(own.redis_url)
            waiting = {k.decode(): int(v) for k, v in client.hgetall(waiting_key(TINY_MODEL_NAME)).items()}
            # the gateway publishes the policy's shares (when it does); as the policy says, in any case
            client.delete(SHARES_KEY)
            client.hset(SHARES_KEY, mapping={**shares, "*": 1})
            client.close()
            assert waiting == counts  # every push counted its team's job
            listing = httpx.get(f"{base}/v1/models", headers=bearer(next(iter(keys.values())))).json()
            assert {m["id"]: m["queue"] for m in listing["data"]}[TINY_MODEL_NAME]["waiting"] == total
            worker = spawn_cli(own, "worker", "--model", TINY_MODEL_NAME, "--concurrency", "1",
                               log=tmp_path / "worker.log")
            for thread in askers:
                thread.join(120)
        finally:
            if worker is not None:
                stop_process(worker, timeout_s=30)
    assert not failures, failures
    assert Counter(served.values()) == counts
    # The worker's order, from its own log (tests/conftest.py, served_in_order: not the audit entries).
    order = [served[r] for r in served_in_order(tmp_path / "worker.log") if r in served]
    assert len(order) == len(served)
    # FIFO would serve all of alpha's jobs first. The schedule charges measured worker time, so a job
    # the machine stalled costs its team more: 128 tokens make a job ~13 ms, long against a stall on a
    # busy machine (at 2 tokens, ~2 ms, one stall charged a team several jobs' worth and the order
    # drifted past the slack 1 run in 5 under a CPU burner). The shares are held to two jobs, not one.
    assert order.index("beta") <= 2, order
    total_weight = sum(shares.values())
    both_waiting = min(counts[team] * total_weight // shares[team] for team in counts)
    assert_shares_held(order[:both_waiting], shares, slack=2)
    assert len(set(order[both_waiting + 2:])) <= 1, order  # then the team with jobs left has the worker


def test_a_killed_pool_process_redelivers_the_job_from_its_fair_list_and_it_ends_once(own_redis, audit_store,
                                                                                    tmp_path):
    """Crash safety in fair mode: the job, taken from its team's list, goes back there when its pool
    process dies, is taken again, and ends in exactly one terminal entry."""
    own = fair_settings(own_redis, tmp_path, {})
    user = f"crash-{os.urandom(3).hex()}"
    key = make_keys(own, {user: "gamma"})[user]
    worker = spawn_cli(own.with_(worker_pool="prefork"), "worker", "--model", TINY_MODEL_NAME,
                       log=tmp_path / "worker.log")
    found: dict = {}

    def kill_once_generating() -> None:
        request_id = wait_for_a_generation(own.redis_url)
        if request_id is None:
            return
        time.sleep(0.2)
        victim = pool_children(worker.pid)[0]
        os.kill(victim, signal.SIGKILL)
        found.update(victim=victim, request_id=request_id)

    try:
        with serving(own, tmp_path / "serve.log") as base:  # started while the worker loads
            wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker)
            killer = threading.Thread(target=kill_once_generating)
            killer.start()
            response = httpx.post(f"{base}/v1/completions", headers=bearer(key), timeout=120,
                                  json={"model": TINY_MODEL_NAME, "prompt": "Tell", "max_tokens": 4000,
                                        "temperature": 0})
            killer.join()
        client = redis.Redis.from_url(own.redis_url)
        registered = [k.decode() for k in client.zrange(registry_key(TINY_MODEL_NAME), 0, -1)]
        waiting = client.hgetall(waiting_key(TINY_MODEL_NAME))
        client.close()
    finally:
        stop_process(worker, timeout_s=30)
    # Once seen (a 504 after 90 s, under a load average of 8): the logs say what the worker did meanwhile.
    logs = "".join(f"\n--- {name} (tail) ---\n{log_tail(tmp_path / name)}" for name in ("worker.log", "serve.log"))
    assert found.get("victim"), "the generation was never seen starting" + logs
    assert response.status_code == 200, response.text + logs
    request_id = response.headers["x-govgate-request-id"]
    assert request_id == found["request_id"]
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "completion"], logs
    assert entries[1].body["worker"]["pid"] != found["victim"]
    assert any(k.startswith(job_queue(TINY_MODEL_NAME, "gamma", user)) for k in registered), registered
    assert not waiting or waiting == {b"gamma": b"0"}  # counted up by the restore, down by the second take
    wait_terminals(audit_store, [request_id], timeout_s=5)
