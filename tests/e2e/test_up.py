"""``govgate up`` from nothing: Redis, worker, API, admin key; Ctrl-C leaves nothing running."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.gateway.test_fail_closed import queued
from workers.contract.registry import TINY_MODEL_NAME

#: A second model in the test registry: its worker starts only once govgate is up.
LATER_MODEL = "later-tiny"


def processes_of(var_dir: Path) -> list[int]:
    """Pids of live processes started with this var dir in their environment."""
    marker = f"GOVGATE_VAR_DIR={var_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                if "State:\tZ" not in status:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _cmdline(pid: int) -> bytes:
    """The process's command line (empty once it has gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class Up:
    """A ``govgate up`` process whose output is read line by line."""

    def __init__(self, env: dict[str, str], python_options: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen([sys.executable, *python_options, "-m", "govgate.cli", "up"], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        stdin=subprocess.DEVNULL)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float = 180, *, new_only: bool = False) -> re.Match:
        """The first line so far or to come that matches (so lines printed in either order are found).

        ``new_only``: only a line not read yet (one printed after those an earlier wait went through).
        """
        for line in [] if new_only else self.seen:
            if match := re.search(pattern, line):
                return match
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.process.poll() is None, "govgate up exited:\n" + "\n".join(self.seen)
                continue
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.seen))

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(90)


@pytest.fixture
def up_env():
    var_dir = Path(tempfile.mkdtemp(prefix="gg-up-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVGATE_")}
    # The built-in default also assembles a 253 MB model; the quick start is tested on the tiny one.
    registry = var_dir / "models.toml"
    registry.write_text("".join(f'[models.{name}]\npath = "models/govgate-tiny-llama.gguf"\n'
                                'generate = "tiny-llama"\ncontext_length = 1024\ntags = ["tiny", "noise"]\n'
                                for name in (TINY_MODEL_NAME, LATER_MODEL)))
    env.update({"GOVGATE_VAR_DIR": str(var_dir), "GOVGATE_PORT": str(port), "GOVGATE_MODELS_FILE": str(registry)})
    yield env, var_dir, f"http://127.0.0.1:{port}"
    for pid in processes_of(var_dir):  # never leak a stack into the rest of the session
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(var_dir, ignore_errors=True)


def test_up_serves_a_governed_request_and_stops_cleanly(up_env):
    env, var_dir, base = up_env
    up = Up(env)
    up_line = up.wait_for(r"govgate is up after (\d+\.\d)s: OpenAI-compatible API at (\S+)")
    assert up_line.group(2) == f"{base}/v1"
    up.wait_for(rf"model {TINY_MODEL_NAME}: ready$")
    # "ready" means its model is loaded, not only that the worker answers pings:
    assert f"loaded model {TINY_MODEL_NAME}" in (var_dir / "logs" / f"worker-{TINY_MODEL_NAME}.log").read_text()
    up.wait_for(rf"model {LATER_MODEL}: starting now \(its requests wait in its queue")
    assert up.wait_for(r"Ctrl-C stops everything")
    # The first model serves before the second model's worker is even started:
    assert not any(f"worker for model {LATER_MODEL}" in line for line in up.seen)
    up.wait_for(rf"worker for model {LATER_MODEL}: starting")
    # The database step (schema, admin key) runs in a child once the first model serves; its lines follow.
    admin_key = up.wait_for(r"admin API key \(shown once, keep it\): (gk_\S+)").group(1)

    user_key = subprocess.run([sys.executable, "-m", "govgate.cli", "keys", "create", "--user", "alice",
                               "--team", "research", "--role", "analyst"], env=env, capture_output=True,
                              text=True, check=True).stdout.strip()
    reply = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {user_key}"},
                       json={"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}],
                             "max_tokens": 5}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 5
    models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {admin_key}"}).json()
    assert sorted(m["id"] for m in models["data"]) == sorted([TINY_MODEL_NAME, LATER_MODEL])
    # A request for the model still starting waits in its queue and is served once its worker is up.
    later = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {admin_key}"},
                       json={"model": LATER_MODEL, "messages": [{"role": "user", "content": "Hello"}],
                             "max_tokens": 3}, timeout=120)
    assert later.status_code == 200, later.text
    assert later.json()["usage"]["completion_tokens"] == 3
    up.wait_for(rf"model {LATER_MODEL}: ready after \d+\.\ds")

    verify = subprocess.run([sys.executable, "-m", "govgate.cli", "audit", "verify"], env=env,
                            capture_output=True, text=True)
    # The chain_format boundary, two requests and their completions, and the two keys' creations (admin by
    # up, alice by the CLI).
    assert verify.returncode == 0 and verify.stdout.startswith("ok: 7 entries"), verify.stdout
    assert "keys: the key table matches the chain (2 keys)" in verify.stdout, verify.stdout

    children = processes_of(var_dir)
    assert len(children) >= 4  # up, redis, worker (+ its pool process), api
    assert up.interrupt() == 0
    deadline = time.monotonic() + 30
    while processes_of(var_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(var_dir) == []
    assert not (var_dir / "redis" / "redis.sock").exists()

    # A second start reuses the admin key and the model instead of making new ones.
    again = Up(env)
    assert again.wait_for(r"admin API key: made on an earlier run; secrets are never shown again")
    hint = again.wait_for(r"^    (\S+) keys create --user admin --role admin$").group(1)
    assert Path(hint).name == "govgate" and (Path(hint).exists() or hint == "govgate"), hint
    assert again.wait_for(r"Ctrl-C stops everything")
    assert again.interrupt() == 0


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (its main thread's, where ``govgate up`` starts them)."""
    listed = Path(f"/proc/{pid}/task/{pid}/children")
    if listed.exists():
        return [int(child) for child in listed.read_text().split()]
    found = []  # kernels without CONFIG_PROC_CHILDREN: every process's parent
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"\nPPid:\t{pid}\n" in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def worker_pid(up: Up, model: str) -> int:
    """The main process of the ``govgate worker --model MODEL`` child of ``govgate up``."""
    for pid in child_pids(up.process.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if args[-3:] == [b"worker", b"--model", model.encode()]:
            return pid
    raise AssertionError(f"no worker for {model} among the children of govgate up:\n" + "\n".join(up.seen))


def test_up_restarts_a_killed_worker_and_keeps_serving(up_env):
    """A worker killed while serving is started again; the API stays up; Ctrl-C mid-restart leaves nothing."""
    env, var_dir, base = up_env
    up = Up(env)
    up.wait_for(r"Ctrl-C stops everything")
    up.wait_for(r"admin API key \(shown once, keep it\): gk_")  # the database step is done
    user_key = subprocess.run([sys.executable, "-m", "govgate.cli", "keys", "create", "--user", "alice",
                               "--team", "research", "--role", "analyst"], env=env, capture_output=True,
                              text=True, check=True).stdout.strip()

    def complete() -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {user_key}"},
                          json={"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}],
                                "max_tokens": 4}, timeout=150)

    first = complete()
    assert first.status_code == 200, first.text
    killed = worker_pid(up, TINY_MODEL_NAME)
    os.kill(killed, signal.SIGKILL)
    up.wait_for(rf"^  worker for model {TINY_MODEL_NAME}: exited with code -9 \(SIGKILL\): .* \(see \S+worker-"
                rf"{TINY_MODEL_NAME}\.log\); restarting in 0\.5s \(1 in the last 60s\)$")
    assert up.process.poll() is None
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200  # the API never stopped
    # Sent while the model has no worker (its exit is seen, so it holds nothing): waits in the queue.
    meanwhile = complete()
    assert meanwhile.status_code == 200, meanwhile.text
    assert meanwhile.json()["usage"]["completion_tokens"] == 4
    up.wait_for(rf"^  model {TINY_MODEL_NAME}: ready again after \d+\.\ds$")
    restarted = worker_pid(up, TINY_MODEL_NAME)
    assert restarted != killed
    after = complete()
    assert after.status_code == 200, after.text
    log = (var_dir / "logs" / f"worker-{TINY_MODEL_NAME}.log").read_text()
    assert log.count(f"loaded model {TINY_MODEL_NAME}") >= 2  # appended to, not truncated
    assert not any("cannot start" in line for line in up.seen)

    # Ctrl-C while the worker is being restarted (its new process starting up) stops everything.
    os.kill(restarted, signal.SIGKILL)
    up.wait_for(rf"^  worker for model {TINY_MODEL_NAME}: exited with code -9 \(SIGKILL\): .*; restarting in [\d.]+s",
                new_only=True)
    up.wait_for(rf"^  worker for model {TINY_MODEL_NAME}: starting \(log: ", new_only=True)
    assert up.interrupt() == 0
    deadline = time.monotonic() + 60
    while processes_of(var_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(var_dir) == []


#: Packages the supervisor must never import: it lives as long as the stack and only starts and watches it.
HEAVY = ("celery", "kombu", "billiard", "sqlalchemy", "sqlmodel", "alembic", "audit", "litestar", "uvicorn",
         "regorus", "ctransformers", "xllamacpp", "gguf", "numpy", "httpx", "redis")


def test_the_supervisor_stays_lean_through_a_whole_start(up_env):
    """Every module ``govgate up`` imports, up to a full start and stop (``-X importtime`` lists them)."""
    env, var_dir, base = up_env
    up = Up(env, python_options=("-X", "importtime"))
    up.wait_for(r"Ctrl-C stops everything")
    up.wait_for(r"admin API key \(shown once, keep it\): gk_")  # the database step ran (in its own process)
    up.wait_for(rf"model {LATER_MODEL}: ready after")
    assert up.interrupt() == 0
    imported = {m.group(1).split(".")[0] for line in up.seen
                if (m := re.match(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", line))}
    assert "govgate.supervisor" in {m.group(1).strip() for line in up.seen
                                    if (m := re.match(r"import time:.*\|\s+(\S+)$", line))}
    assert [name for name in HEAVY if name in imported] == []


def test_up_on_a_busy_port_says_so_and_starts_nothing(up_env):
    env, var_dir, base = up_env
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        result = subprocess.run([sys.executable, "-m", "govgate.cli", "up"], env=env, capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stdout + result.stderr
    problem = [line for line in result.stdout.splitlines() if "cannot start" in line]
    assert problem == [f"govgate: cannot start: port {port} on 127.0.0.1 is already in use: "
                       "set GOVGATE_PORT to a free port (or stop what listens there)"], result.stdout
    assert "govgate is up" not in result.stdout and "worker for model" not in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (var_dir / "redis").exists()  # nothing was started


def quick_start_request(model: str) -> dict:
    """The JSON body of the README quick start's curl command for ``model``."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    bodies = [json.loads(m.group(1)) for m in re.finditer(r"-d '(\{.*?\})'", quick_start)]
    found = [body for body in bodies if body.get("model") == model]
    assert found, f"no curl request for {model} in the README's quick start"
    return found[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quick_start_question_gets_the_right_answer_from_gemma(up_env):
    """The README's own example, sent as written to `govgate up` on the default registry."""
    from workers.contract.registry import DEFAULT_MODEL_NAME

    env, var_dir, base = up_env
    env = {k: v for k, v in env.items() if k != "GOVGATE_MODELS_FILE"}
    up = Up(env)
    up.wait_for(r"Ctrl-C stops everything", timeout_s=600)
    user_key = subprocess.run([sys.executable, "-m", "govgate.cli", "keys", "create", "--user", "alice",
                               "--team", "research", "--role", "analyst"], env=env, capture_output=True,
                              text=True, check=True).stdout.strip()
    body = quick_start_request(DEFAULT_MODEL_NAME)
    assert "France" in body["messages"][0]["content"]
    reply = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {user_key}"},
                       json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    assert up.interrupt() == 0


def test_the_readme_python_example_runs_with_the_client_extra(served_api, keyring):
    """The quick start's Python example, run as written (address and key swapped in), needs only the extra."""
    import tomllib

    root = ROOT
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [dep.split(">")[0] for dep in extras["client"]] == ["openai"]
    quick_start = (root / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "pip install -c constraints.txt -e '.[client]'" in quick_start
    example = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
    assert "http://127.0.0.1:8080/v1" in example and '"gk_…"' in example
    example = example.replace("http://127.0.0.1:8080/v1", f"{served_api}/v1").replace('"gk_…"', repr(keyring["analyst"]))
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["reply"].usage.completion_tokens > 0  # and the streaming loop ran without an error


def test_up_names_the_reason_a_child_died(up_env):
    """A child that cannot start: the reason from its log is in the one line ``up`` prints."""
    env, var_dir, base = up_env
    env = {**env, "GOVGATE_POLICY_DIR": str(var_dir / "no-such-policies")}
    result = subprocess.run([sys.executable, "-m", "govgate.cli", "up"], env=env, capture_output=True,
                            text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stdout + result.stderr
    problem = [line for line in result.stdout.splitlines() if "cannot start" in line]
    assert len(problem) == 1, result.stdout
    assert problem[0].startswith("govgate: cannot start: api exited with code 1: Error: GOVGATE_POLICY_DIR=")
    assert "is not a folder" in problem[0] and str(var_dir / "logs" / "api.log") in problem[0]
    assert "govgate is up" not in result.stdout


def test_up_with_a_model_file_that_cannot_load_says_so_at_once(up_env):
    """A worker whose model the backend refuses exits at once with the reason (it used to consume its queue
    without a model while ``up`` waited ``GOVGATE_WORKER_START_TIMEOUT_S``, 300 s by default, to say "no
    worker answered")."""
    env, var_dir, base = up_env
    broken = var_dir / "models" / "broken.gguf"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"GGUF" + bytes(60))  # a GGUF header cut short: the file exists, no backend can load it
    (var_dir / "models.toml").write_text(f'[models.broken]\npath = "{broken}"\ncontext_length = 256\n')
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "govgate.cli", "up"], env=env, capture_output=True,
                            text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 60, result.stdout  # not the start timeout
    problem = [line for line in result.stdout.splitlines() if "cannot start" in line]
    assert len(problem) == 1, result.stdout
    assert problem[0].startswith("govgate: cannot start: worker broken exited with code 1: "), problem[0]
    # checked before the backend sees it (a GGUF of version 0: ctransformers would trust any version)
    assert "model broken cannot be served, the worker stops: model file " in problem[0], problem[0]
    assert "is not a GGUF file govgate can read (GGUF version 0 is not supported)" in problem[0], problem[0]
    assert "govgate is up" not in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_up_whose_first_model_cannot_load_serves_the_others(up_env, tiny_model_path):
    """The cheapest model's file is corrupt: that model is given up and the next one is started in its place;
    the API serves it, and the broken model's requests are refused with 503 model_unavailable and the reason
    (``up`` used to stop the whole stack here)."""
    from tests.conftest_models import TINY_CONTEXT

    env, var_dir, base = up_env
    broken = var_dir / "models" / "broken.gguf"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"GGUF" + bytes(60))  # a header cut short: the smallest file, so started first
    assert broken.stat().st_size < tiny_model_path.stat().st_size
    (var_dir / "models.toml").write_text(
        f'[models.broken]\npath = "{broken}"\ncontext_length = 256\n\n'
        f'[models.{TINY_MODEL_NAME}]\npath = "{tiny_model_path}"\ncontext_length = {TINY_CONTEXT}\n'
        'tags = ["tiny", "noise"]\n')
    up = Up(env)
    given_up = up.wait_for(r"^  worker for model broken: exited with code 1: .*; it never got ready, so not again: "
                           r"requests for broken are refused with model_unavailable")
    assert "is not a GGUF file govgate can read" in given_up.string, given_up.string
    up.wait_for(rf"^  worker for model {TINY_MODEL_NAME}: starting")
    up.wait_for(r"govgate is up after")
    up.wait_for(rf"^  model {TINY_MODEL_NAME}: ready$")
    up.wait_for(r"^  model broken: given up, its worker could not start")
    admin_key = up.wait_for(r"admin API key \(shown once, keep it\): (gk_\S+)").group(1)
    assert not any("cannot start" in line for line in up.seen)

    headers = {"Authorization": f"Bearer {admin_key}"}
    served = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=60,
                        json={"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}],
                              "max_tokens": 3})
    assert served.status_code == 200, served.text
    refused = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=60,
                         json={"model": "broken", "messages": [{"role": "user", "content": "Hello"}],
                               "max_tokens": 3})
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "model_unavailable" and "GGUF version 0 is not supported" in error["message"], error
    assert up.process.poll() is None
    log = (var_dir / "logs" / "worker-broken.log").read_text()
    assert log.count("model broken cannot be served, the worker stops") == 1  # given up: not started again
    assert up.interrupt() == 0
    deadline = time.monotonic() + 60
    while processes_of(var_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(var_dir) == []


def test_up_whose_first_model_hangs_while_loading_gives_it_up_and_serves_the_next(up_env, tiny_model_path):
    """The first model's worker never gets ready and never exits (frozen with SIGSTOP as it starts, before its
    imports are done: a load hung on a stuck disk looks the same to ``up``). After
    ``GOVGATE_WORKER_START_TIMEOUT_S`` it is stopped (killed: SIGTERM waits on a frozen process), the model given
    up and the next one started in its place (``up`` used to stop the whole start after 120 s)."""
    from tests.conftest_models import TINY_CONTEXT

    env, var_dir, base = up_env
    # Listed first with the same file: the start order is by size, ties in the registry's order.
    (var_dir / "models.toml").write_text("".join(
        f'[models.{name}]\npath = "{tiny_model_path}"\ncontext_length = {TINY_CONTEXT}\ntags = ["tiny", "noise"]\n\n'
        for name in ("hung", TINY_MODEL_NAME)))
    up = Up({**env, "GOVGATE_WORKER_START_TIMEOUT_S": "8"})
    up.wait_for(r"^  worker for model hung: starting")
    deadline = time.monotonic() + 10
    while not (hung := [pid for pid in processes_of(var_dir) if b"hung" in _cmdline(pid)]):
        assert time.monotonic() < deadline, "the hung model's worker never appeared"
    os.kill(hung[0], signal.SIGSTOP)
    up.wait_for(r"^  worker for model hung: did not load its model within 8s \(GOVGATE_WORKER_START_TIMEOUT_S\), "
                r"so it was stopped \(see .*worker-hung\.log\); it never got ready, so not again")
    up.wait_for(rf"^  worker for model {TINY_MODEL_NAME}: starting")
    up.wait_for(r"govgate is up after")
    up.wait_for(r"^  model hung: given up, its worker could not start")
    admin_key = up.wait_for(r"admin API key \(shown once, keep it\): (gk_\S+)").group(1)
    assert not any("cannot start" in line for line in up.seen)
    served = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {admin_key}"},
                        timeout=60, json={"model": TINY_MODEL_NAME, "max_tokens": 3,
                                          "messages": [{"role": "user", "content": "Hello"}]})
    assert served.status_code == 200, served.text
    assert hung[0] not in processes_of(var_dir)  # the frozen worker is gone, not left behind
    assert up.interrupt() == 0


def test_a_second_ctrl_c_to_up_cuts_the_drain_short_and_the_request_in_flight_is_answered(up_env):
    """Ctrl-C says how long the API drains and how to skip it; Ctrl-C again reaches the API, which ends its
    requests in flight at once (each with its answer), so ``up`` exits long before the drain's end.

    Before (probe p1 F3), ``up`` only noted that it was stopping: a second Ctrl-C neither reached the API
    nor shortened ``up``'s wait for it (``GOVGATE_DRAIN_S`` + 30 s), with nothing said about it. The drain
    here (60 s) is longer than the test waits for the answer and the exit (30 s each).
    """
    env, var_dir, base = up_env
    env = {**env, "GOVGATE_DRAIN_S": "60"}
    up = Up(env)
    up.wait_for(r"Ctrl-C stops everything")
    admin_key = up.wait_for(r"admin API key \(shown once, keep it\): (gk_\S+)").group(1)
    worker = worker_pid(up, TINY_MODEL_NAME)
    held = [worker, *child_pids(worker)]
    queue = SimpleNamespace(redis_url=f"unix://{var_dir / 'redis' / 'redis.sock'}?db=0")
    for pid in held:
        os.kill(pid, signal.SIGSTOP)  # the request stays queued: in flight when the stop comes
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{base}/v1/chat/completions",
                                  headers={"Authorization": f"Bearer {admin_key}"}, timeout=120,
                                  json={"model": TINY_MODEL_NAME, "max_tokens": 5,
                                        "messages": [{"role": "user", "content": "Hello"}]})
            deadline = time.monotonic() + 60
            while queued(queue, TINY_MODEL_NAME) < 1:
                assert time.monotonic() < deadline, "the request was never queued"
                time.sleep(0.05)
            up.process.send_signal(signal.SIGINT)
            up.wait_for(r"api: stopping; requests still in flight, if any, get up to 60s \(a second Ctrl-C or "
                        r"SIGTERM ends them now\)",
                        timeout_s=30, new_only=True)
            up.process.send_signal(signal.SIGINT)
            answered = pending.result(timeout=30)  # long before the 60 s drain would have ended
        for pid in held:
            os.kill(pid, signal.SIGCONT)  # the worker may stop now (it never took the request)
        assert up.process.wait(timeout=30) == 0
    finally:
        for pid in held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert answered.status_code == 503, answered.text
    assert answered.json()["error"]["code"] == "shutting_down"
    assert answered.headers["retry-after"]
