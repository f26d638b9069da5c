"""A real worker process: a lean main process, and an audit store ready before its first job.

With Celery's prefork pool (``GOVGATE_WORKER_POOL=prefork``) the worker's main
process only consumes the queue; the audit store and the generation code are
loaded by its pool process after fork, and the schema is
migrated (and terminal entries kept while the database was down are
written) by a short-lived child before the pool forks (``workers/runtime.py``,
``workers/store_prep.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
import redis

from audit import AuditStore, make_engine
from govgate.processes import child_preexec, stop_process
from govgate.supervisor import child_env
from tests.conftest import wait_for_worker
from tests.own_redis import own_redis  # noqa: F401 - fixture
from workers.contract.liveness import MODEL_FAILED_TTL_S, model_failed_key
from workers.contract.celery_config import make_celery
from workers.contract.queue_layout import queue_keys
from workers.contract.jobs import GENERATE_TASK, STATUS_COMPLETED, GenerateJob, open_result, queue_for, result_key
from workers.contract.pending_terminals import PENDING_KEY, PendingTerminal, PendingTerminals
from workers.contract.registry import TINY_MODEL_NAME
from workers.contract.sampling import SamplingParams
from workers.contract.sealing import Sealer, load_or_create_key
from workers.tinymodel import write_tiny_llama_gguf

#: Runs ``govgate worker`` and, as its main process exits, lists the modules it imported.
#: (Forked children leave with ``os._exit`` and never run the hook.)
_LIST_MODULES = """
import atexit, os, runpy, sys
main, out = os.getpid(), sys.argv.pop(1)
def _list():
    if os.getpid() == main:
        with open(out, "w") as handle:
            handle.write("\\n".join(sorted(sys.modules)))
atexit.register(_list)
sys.argv[0] = "govgate"
runpy.run_module("govgate.cli", run_name="__main__", alter_sys=True)
"""

#: What the main process must not load (each stays resident there for the life of the worker).
POOL_ONLY = ("sqlalchemy", "sqlmodel", "alembic", "audit", "workers.generation", "workers.pool", "ctransformers",
             "xllamacpp", "workers.backends.ctransformers_backend", "workers.backends.llamacpp_backend",
             "cryptography.hazmat.primitives.ciphers")


#: What a worker loads for nothing (each would stay resident beside the model, docs/performance.md): celery's
#: command line with its shell's prompt_toolkit and pygments, the Hugging Face hub client that
#: ``import ctransformers`` brings, and SQLAlchemy, SQLModel, pydantic and Alembic (the jobs append on the
#: database driver with statements the store-prep child compiled: audit/driver_store.py).
NEVER_LOADED = ("celery.bin", "click_repl", "prompt_toolkit", "pygments", "huggingface_hub", "ctransformers",
                "sqlalchemy", "sqlmodel", "pydantic", "alembic")


def _start_listed_worker(own, modules, log_path) -> subprocess.Popen:
    """``govgate worker`` for the tiny model whose main process lists its modules in ``modules`` as it exits."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-c", _LIST_MODULES, str(modules), "worker", "--model",
                                 TINY_MODEL_NAME], env=child_env(own, own.redis_url), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_preexec())
    finally:
        log.close()  # the child holds its own copy


@pytest.fixture
def empty_database_worker(own_redis, tmp_path):  # noqa: F811
    """A tiny-model worker on a database file that does not exist yet, with one terminal entry kept."""
    # prefork: the lean main process is what this module checks (with solo the main process is the pool)
    own = own_redis.with_(database_url=f"sqlite:///{tmp_path / 'fresh' / 'audit.db'}", worker_pool="prefork")
    client = redis.Redis.from_url(own.redis_url)
    sealer = Sealer(load_or_create_key(own.effective_payload_key_file))
    PendingTerminals(client, horizon_s=3600, seal=sealer.seal, unseal=sealer.unseal).keep(PendingTerminal(
        kind="failed", request_id="kept-while-down", principal="alice", team="research", model=TINY_MODEL_NAME,
        body={"error": {"code": "audit_unavailable"}}, policy_revision="rev"))
    modules = tmp_path / "modules.txt"
    worker = _start_listed_worker(own, modules, tmp_path / "worker.log")
    try:
        wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker, timeout_s=120)
        yield own, worker, client, sealer, modules
    finally:
        stop_process(worker, timeout_s=30)
        client.close()


def _send_job(own, sealer: Sealer, request_id: str, model: str = TINY_MODEL_NAME) -> None:
    """Queue one sealed two-token job for ``model``, as a gateway would."""
    job = GenerateJob(request_id=request_id, model=model, endpoint="completions", prompt="Hi",
                      params=SamplingParams(max_tokens=2, temperature=0), principal="alice", team="research",
                      policy_revision="rev")
    app = make_celery(own.redis_url)
    try:
        app.send_task(GENERATE_TASK, args=[job.sealed(sealer)], queue=queue_for(model), task_id=request_id)
    finally:
        app.close()


def _run_one_job(own, client: redis.Redis, sealer: Sealer) -> dict:
    request_id = f"first-{uuid.uuid4().hex[:8]}"
    _send_job(own, sealer, request_id)
    deadline = time.monotonic() + 60
    while (raw := client.get(result_key(request_id))) is None:
        assert time.monotonic() < deadline, "the job was never answered"
        time.sleep(0.05)
    return {"request_id": request_id, **json.loads(raw)}


def test_a_worker_on_an_empty_database_records_its_first_job_and_the_kept_entries(empty_database_worker):
    own, _worker, client, sealer, _modules = empty_database_worker
    store = AuditStore(make_engine(own.effective_database_url))
    try:
        # The kept entry was written before the pool forked, into the schema made just before.
        assert store.terminal_for("kept-while-down").kind == "failed"
        assert not client.hexists(PENDING_KEY, "kept-while-down")
        outcome = _run_one_job(own, client, sealer)
        assert outcome["status"] == "SUCCESS"
        assert open_result(outcome["result"], sealer)["status"] == STATUS_COMPLETED
        assert store.terminal_for(outcome["request_id"]).kind == "completion"
    finally:
        store.engine.dispose()


def test_the_worker_main_process_imports_no_audit_store_or_model_code(empty_database_worker):
    own, worker, client, sealer, modules = empty_database_worker
    assert _run_one_job(own, client, sealer)["status"] == "SUCCESS"  # the pool process ran a job meanwhile
    stop_process(worker, timeout_s=30)
    imported = modules.read_text().split()
    assert "celery" in imported and "workers.runtime" in imported  # the listing is of the worker's main process
    assert [m for m in imported if any(m == name or m.startswith(name + ".") for name in POOL_ONLY)] == []


def test_a_solo_worker_serves_without_celerys_command_line_or_the_hub_client(own_redis, tmp_path):  # noqa: F811
    """The default pool: the one process loads the model and the audit store, and nothing it never uses."""
    own = own_redis.with_(worker_pool="solo")
    client = redis.Redis.from_url(own.redis_url)
    sealer = Sealer(load_or_create_key(own.effective_payload_key_file))
    modules = tmp_path / "modules.txt"
    client.set(model_failed_key(TINY_MODEL_NAME), "an earlier worker could not load it")
    worker = _start_listed_worker(own, modules, tmp_path / "worker.log")
    try:
        wait_for_worker(own.redis_url, TINY_MODEL_NAME, worker, timeout_s=120)
        assert client.get(model_failed_key(TINY_MODEL_NAME)) is None  # a worker that loads it clears the failure
        outcome = _run_one_job(own, client, sealer)
        assert open_result(outcome["result"], sealer)["status"] == STATUS_COMPLETED
    finally:
        stop_process(worker, timeout_s=30)
        client.close()
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
    imported = modules.read_text().split()
    # the listing is of the process that ran the job, its model loaded through ctransformers' own LLM class
    assert {"celery.apps.worker", "workers.pool", "_govgate_ctransformers.llm"} <= set(imported)
    assert [m for m in imported if any(m == name or m.startswith(name + ".") for name in NEVER_LOADED)] == []


#: ``govgate worker`` with a planted fault: a worker bootstep whose start raises, as an unusable broker
#: or pool would (a fault injected into the real worker, not a stand-in for it).
_FAILING_START = """
import runpy, sys
import celery.bootsteps
import workers.runtime

class PlantedFault(celery.bootsteps.StartStopStep):
    def start(self, worker):
        raise RuntimeError("planted fault at start")

_build = workers.runtime.build_worker_app
def build_with_fault(config):
    app = _build(config)
    app.steps["worker"].add(PlantedFault)
    return app
workers.runtime.build_worker_app = build_with_fault
sys.argv[0] = "govgate"
runpy.run_module("govgate.cli", run_name="__main__", alter_sys=True)
"""


def test_a_worker_that_cannot_start_exits_with_celerys_failure_status(own_redis, tmp_path):  # noqa: F811
    """Celery logs the unrecoverable error and stops; the process says so in its exit status (it exited 0
    while the worker was started through Celery's command line, whose status was dropped)."""
    done = subprocess.run([sys.executable, "-c", _FAILING_START, "worker", "--model", TINY_MODEL_NAME],
                          env=child_env(own_redis, own_redis.redis_url), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Unrecoverable error: RuntimeError('planted fault at start')" in done.stdout + done.stderr


def _broken_model_settings(own, tmp_path, pool: str):
    """Settings whose registry has one model, ``broken``: a GGUF file cut short after its header.

    It passes the command's checks (the file exists) and fails in the backend's load, as a truncated
    download or a file of an architecture the backend cannot run does.
    """
    model = tmp_path / "broken.gguf"
    model.write_bytes(write_tiny_llama_gguf(tmp_path / "whole.gguf").read_bytes()[:4096])
    registry = tmp_path / "models.toml"
    registry.write_text(f'[models.broken]\npath = "{model}"\ncontext_length = 256\n')
    return own.with_(models_file=str(registry), worker_pool=pool)


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_worker_whose_model_fails_to_load_exits_with_the_reason(own_redis, tmp_path, pool):  # noqa: F811
    """Not a worker that consumes its queue without a model (it failed every job, loading again each time):
    the process exits 1 with the backend's reason in its log, and the model's jobs stay queued."""
    own = _broken_model_settings(own_redis, tmp_path, pool)
    client = redis.Redis.from_url(own.redis_url)
    sealer = Sealer(load_or_create_key(own.effective_payload_key_file))
    request_id = "waits-for-a-model"
    _send_job(own, sealer, request_id, model="broken")
    log_path = tmp_path / "worker.log"
    with open(log_path, "ab") as log:
        worker = subprocess.Popen([sys.executable, "-m", "govgate.cli", "worker", "--model", "broken"],
                                  env=child_env(own, own.redis_url), stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, preexec_fn=child_preexec())
    try:
        code = worker.wait(timeout=60)
    finally:
        stop_process(worker, timeout_s=10)
    text = log_path.read_text()
    assert code == 1, text[-3000:]
    assert "model broken cannot be served, the worker stops: model file " in text, text[-3000:]
    last = [line for line in text.splitlines() if line.strip()][-1]  # what `govgate up` shows of it
    assert "model broken cannot be served" in last, last
    try:  # the job was neither answered nor lost: it waits in the model's queue for a worker that can serve it
        assert client.get(result_key(request_id)) is None
        assert sum(client.llen(key) for key in queue_keys(queue_for("broken"))) == 1
        # and gateways are told why, to refuse the model's new requests at once while no worker lives
        said = client.get(model_failed_key("broken"))
        assert said is not None and said.decode().startswith("model file "), said
        assert 0 < client.ttl(model_failed_key("broken")) <= MODEL_FAILED_TTL_S
    finally:
        client.delete(model_failed_key("broken"))
        client.close()
