"""A served gateway (real uvicorn) under concurrent requests: JSON log lines, ids, metrics, readiness."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import httpx
import pytest
import redis

from gateway import urls
from tests.conftest import bearer, serving, spawn_cli, wait_for_worker
from tests.ops.metrics_text import samples, value
from govgate.processes import stop_process
from workers.contract.liveness import BEAT_SCRIPT, LIVE_SCRIPT, WORKERS_KEY, live_counts, member
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio

#: In every prompt: it must never reach a log line.
MARKER = "ZQX-prompt-marker-7731"
CHAT = urls.CHAT_COMPLETIONS


def parsed(line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:
        raise AssertionError(f"not a JSON log line: {line!r}") from None


def tiny_only_registry(folder: Path, model_path: Path) -> Path:
    """A registry of the one model the suite's worker serves, so the gateway can be ready."""
    path = folder / "tiny-only.toml"
    path.write_text(f'[models.{TINY_MODEL_NAME}]\npath = "{model_path}"\ngenerate = "tiny-llama"\n'
                    'context_length = 4096\nfamily = "llama"\ntags = ["tiny"]\n')
    return path


@pytest.fixture
def json_served(settings, worker, tmp_path):
    """``govgate serve`` writing JSON logs with an access line per request; yields (base URL, log file)."""
    model_path = settings.var_dir / "models" / "govgate-tiny-llama.gguf"
    own = settings.with_(models_file=str(tiny_only_registry(tmp_path, model_path)), log_format="json",
                         access_log=True)
    log = tmp_path / "serve.log"
    with serving(own, log) as base:
        yield base, log


async def test_concurrent_requests_log_json_lines_with_their_ids_and_count_exactly(json_served, keyring,
                                                                                    audit_store):
    base, log = json_served
    async with httpx.AsyncClient(timeout=120) as http:
        admin = bearer(keyring["admin"])
        ready = await http.get(base + urls.READY, headers=admin)
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready" and ready.json()["workers"][TINY_MODEL_NAME] >= 1
        before = samples((await http.get(base + urls.METRICS, headers=admin)).text)
        answers: list[httpx.Response] = []

        async def one(n: int) -> None:
            key = keyring["viewer"] if n % 4 == 0 else keyring["analyst"]  # every fourth is denied
            answers.append(await http.post(base + CHAT, headers=bearer(key), json={
                "model": TINY_MODEL_NAME, "max_tokens": 4,
                "messages": [{"role": "user", "content": f"{MARKER} number {n}"}]}))

        async with anyio.create_task_group() as group:
            for n in range(12):
                group.start_soon(one, n)
        after = samples((await http.get(base + urls.METRICS, headers=admin)).text)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 9 + [404] * 3  # the viewer may see no model: answered as an unknown one
    labels = {"endpoint": CHAT, "model": TINY_MODEL_NAME}
    assert value(after, "govgate_requests_total", **labels, status="2xx", code="") \
        - value(before, "govgate_requests_total", **labels, status="2xx", code="") == 9
    assert value(after, "govgate_requests_total", **labels, status="4xx", code="policy_denied") \
        - value(before, "govgate_requests_total", **labels, status="4xx", code="policy_denied") == 3

    time.sleep(0.2)  # the access line is written as the response ends; let the last ones reach the file
    text = log.read_text()
    assert MARKER not in text
    lines = [parsed(line) for line in text.splitlines() if line.strip()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = {line["request_id"]: line for line in lines if line["logger"] == "govgate.access"}
    for answer in answers:
        rid = answer.headers[urls.REQUEST_ID_HEADER]
        line = access[rid]
        assert (line["path"], line["status"], line["model"]) == (CHAT, answer.status_code, TINY_MODEL_NAME)
        assert line["code"] == (None if answer.status_code == 200 else "policy_denied")  # what it truly was
        assert audit_store.entries_for(rid)[0].kind == "request"
        assert audit_store.entries_for(rid)[0].request_id == rid


def test_a_worker_leaves_the_live_set_when_it_stops(settings, tmp_path):
    """The heartbeat counts a started worker and forgets it on a clean stop, at once."""
    client = redis.Redis.from_url(settings.redis_url)
    live = client.register_script(LIVE_SCRIPT)
    before = live_counts(live(keys=[WORKERS_KEY])).get(TINY_MODEL_NAME, 0)
    process = spawn_cli(settings, "worker", "--model", TINY_MODEL_NAME, log=tmp_path / "worker.log")
    try:
        wait_for_worker(settings.redis_url, TINY_MODEL_NAME, process)
        deadline = time.monotonic() + 30
        while live_counts(live(keys=[WORKERS_KEY])).get(TINY_MODEL_NAME, 0) != before + 1:
            assert time.monotonic() < deadline, "the new worker never counted as live"
            time.sleep(0.1)
    finally:
        stop_process(process, timeout_s=30)
    assert live_counts(live(keys=[WORKERS_KEY])).get(TINY_MODEL_NAME, 0) == before
    client.close()


def test_a_silent_worker_drops_out_after_its_ttl(settings):
    """A worker killed without leaving stops counting once its beat's TTL has passed (Redis's clock)."""
    client = redis.Redis.from_url(settings.redis_url)
    beat, live = client.register_script(BEAT_SCRIPT), client.register_script(LIVE_SCRIPT)
    gone = member("ghost-model", "ghost.1@nowhere")
    beat(keys=[WORKERS_KEY], args=[gone, 1])
    assert live_counts(live(keys=[WORKERS_KEY])).get("ghost-model") == 1
    deadline = time.monotonic() + 30  # polled: the TTL is 1 s of Redis's clock, a busy machine may run late
    while "ghost-model" in live_counts(live(keys=[WORKERS_KEY])):
        assert time.monotonic() < deadline, "the silent worker never dropped out"
        time.sleep(0.05)
    beat(keys=[WORKERS_KEY], args=[member("other", "x"), 1])  # the next beat sweeps the dead member
    assert gone.encode() not in client.zrange(WORKERS_KEY, 0, -1)
    client.zrem(WORKERS_KEY, member("other", "x"))
    client.close()
