"""``govgate up``'s supervisor: readiness from Redis, restarting workers that exit, the database step in a child.

That the supervisor imports nothing heavy is checked on a real ``govgate up``
in tests/e2e/test_up.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from govgate.processes import stop_process
from govgate.restarts import RestartPolicy
from govgate.stack import Stack, StartupError
from govgate.supervisor import DatabaseStep, Launcher, child_env
from tests.conftest import ROOT
from tests.own_redis import own_redis  # noqa: F401  (a Redis this module may make refuse writes)
from tests.ops.test_api_can_serve import answering, checks  # noqa: F401  (the fake /readyz fixture)
from workers.contract.jobs import loaded_key

@pytest.fixture
def launcher(settings, tmp_path):
    stack = Stack(logs=tmp_path)
    said: list[str] = []
    launch = Launcher(settings, stack, child_env(settings, settings.redis_url), settings.redis_url, said.append,
                      time.monotonic())
    yield launch, stack, said
    for proc in stack.workers.values():
        stop_process(proc, timeout_s=5)
    launch.close()


def _stand_in(stack: Stack, name: str) -> subprocess.Popen:
    """A process that stays alive like a worker but never loads anything."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stack.workers[name] = proc
    return proc


def test_a_worker_is_ready_only_once_its_pool_says_the_model_is_loaded(launcher, settings):
    launch, stack, _ = launcher
    proc = _stand_in(stack, "slow-model")
    launch.pending["slow-model"] = time.monotonic()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert launch.poll() == []  # alive, but nothing loaded yet: still pending
        client.set(loaded_key("slow-model", proc.pid + 1), 1, ex=30)  # another worker's key does not count
        assert launch.poll() == [] and "slow-model" in launch.pending
        client.set(loaded_key("slow-model", proc.pid), 1, ex=30)
        assert launch.poll() == ["slow-model"]
        assert launch.pending == {} and launch.poll() == []
    finally:
        client.delete(loaded_key("slow-model", proc.pid), loaded_key("slow-model", proc.pid + 1))
        client.close()


def test_a_first_worker_that_never_loads_is_stopped_and_named_so_up_tries_the_next(launcher):
    """A worker hung while loading (alive, never ready) used to stop ``up`` after 120 s: it is stopped after
    the load timeout and :class:`NeverReady` lets ``up`` give its model up and start the next cheapest."""
    from govgate.launcher import NeverReady

    launch, stack, _ = launcher
    proc = _stand_in(stack, "never-loads")
    launch.pending["never-loads"] = time.monotonic() - 10
    assert launch.poll(timeout_s=60) == [] and proc.poll() is None  # within the bound: still waited for
    with pytest.raises(NeverReady, match=r"^worker never-loads did not load its model within 5s "
                                         r"\(GOVGATE_WORKER_START_TIMEOUT_S\), so it was stopped \(see .*"
                                         r"worker-never-loads\.log\)$") as failed:
        launch.poll(timeout_s=5)
    assert failed.value.model == "never-loads"
    assert proc.poll() is not None and "never-loads" not in launch.pending


def test_the_load_timeout_is_the_worker_start_timeout_setting(settings, tmp_path):
    stack = Stack(logs=tmp_path)
    launch = Launcher(settings.with_(worker_start_timeout_s=42.0), stack, {}, settings.redis_url, print,
                      time.monotonic())
    try:
        assert launch.load_timeout_s == 42.0
    finally:
        launch.close()


def test_a_later_model_that_never_loads_is_given_up_while_the_others_keep_serving(launcher):
    """Once serving, a later model's hung worker used to raise out of ``up``'s loop and stop the whole stack."""
    launch, stack, said = launcher
    launch.serving = True
    steady = _stand_in(stack, "steady")
    launch.ever_ready.add("steady")
    hung = _stand_in(stack, "big")
    launch.pending["big"] = time.monotonic() - 10
    assert launch.poll(timeout_s=5) == []
    assert hung.poll() is not None and launch.given_up == {"big"} and launch.pending == {}
    assert said[-1].startswith("  worker for model big: did not load its model within 5s")
    assert said[-1].endswith("it never got ready, so not again: requests for big are refused with model_unavailable "
                             "if its worker could not load it, else wait in its queue until they time out; the rest "
                             "keeps serving (fix it, then restart govgate up)")
    assert launch.poll(timeout_s=5) == [] and len(said) == 1  # the stopped worker is not restarted nor told again
    assert steady.poll() is None and launch.restart_due == {}


def test_a_restarted_worker_slow_to_load_again_is_waited_for(launcher):
    launch, stack, said = launcher
    launch.serving = True
    proc = _stand_in(stack, "tiny")
    launch.ever_ready.add("tiny")
    launch.pending["tiny"] = time.monotonic() - 10
    assert launch.poll(timeout_s=5) == [] and proc.poll() is None and "tiny" in launch.pending and said == []


def test_an_api_that_never_gets_ready_fails_the_start_saying_why(launcher, answering):
    launch, stack, _ = launcher
    stack.api = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # alive, never ready
    try:
        launch.health_url = answering(503, checks(
            redis="error: refuses writes: OutOfMemoryError: command not allowed when used memory > 'maxmemory'."))
        launch.api_started = time.monotonic() - 10
        with pytest.raises(StartupError, match=r"did not become ready at .* within 5s: redis: error: refuses "
                                               r"writes: OutOfMemoryError: command not allowed"):
            launch.poll(api_timeout_s=5)
    finally:
        stop_process(stack.api, timeout_s=5)


def _exited(stack: Stack, name: str, code: int, last_line: str) -> subprocess.Popen:
    """A stand-in worker that wrote ``last_line`` to its log and has exited with ``code``."""
    assert stack.logs is not None
    with (stack.logs / f"worker-{name}.log").open("a") as log:
        end = f"os.kill(os.getpid(), {-code})" if code < 0 else f"raise SystemExit({code})"  # -N: killed by N
        proc = subprocess.Popen([sys.executable, "-c", f"import os; print({last_line!r}, flush=True); {end}"],
                                stdout=log)
    proc.wait()
    stack.workers[name] = proc
    return proc


def test_a_worker_that_exits_before_it_was_ever_ready_fails_the_start_naming_why(launcher):
    launch, stack, said = launcher
    _exited(stack, "broken", 3, "Error: the model file is broken")
    launch.pending["broken"] = time.monotonic()
    with pytest.raises(StartupError, match=r"^worker broken exited with code 3: Error: the model file is broken "
                                           r"\(see .*worker-broken\.log\)$"):
        launch.poll()


def test_a_worker_that_exits_once_serving_is_restarted_after_its_wait(launcher):
    launch, stack, said = launcher
    launch.serving = True
    launch.ever_ready.add("tiny")
    launch.policies["tiny"] = RestartPolicy(first_backoff_s=3600)  # due long after this test
    _exited(stack, "tiny", -9, "pid 7 loaded model tiny")
    launch.pending["tiny"] = time.monotonic()  # it was loading again, even
    assert launch.poll() == []
    assert said[-1].startswith("  worker for model tiny: exited with code -9 (SIGKILL): pid 7 loaded model tiny (see ")
    assert said[-1].endswith("; restarting in 3600s (1 in the last 60s)")
    assert "tiny" in launch.restart_due and "tiny" not in launch.pending
    assert launch.poll() == [] and len(said) == 1  # one decision per exit, not one per poll


def test_a_worker_killed_by_a_signal_is_reported_with_the_signal_s_name(launcher):
    # A model file cut short under a running worker kills it with SIGBUS; its log's last line is a routine one.
    launch, stack, said = launcher
    launch.serving = True
    launch.ever_ready.add("cut")
    launch.policies["cut"] = RestartPolicy(first_backoff_s=3600)
    _exited(stack, "cut", -7, "cut.1205@vm ready.")
    launch.poll()
    assert said[-1].startswith("  worker for model cut: exited with code -7 (SIGBUS): cut.1205@vm ready. (see ")


def test_a_later_model_that_dies_while_loading_is_restarted_too(launcher):
    """Past the start, even a worker never ready is restarted: the give-up limit ends a broken one's loop."""
    launch, stack, said = launcher
    launch.serving = True
    launch.policies["later"] = RestartPolicy(first_backoff_s=3600)
    _exited(stack, "later", 1, "Error: out of memory")
    launch.pending["later"] = time.monotonic()
    launch.poll()
    assert "restarting in 3600s" in said[-1] and "later" in launch.restart_due


def test_a_worker_restarted_too_often_is_given_up_and_the_rest_keeps_running(launcher):
    launch, stack, said = launcher
    launch.serving = True
    launch.ever_ready.update({"crashy", "steady"})
    launch.policies["crashy"] = RestartPolicy(max_restarts=0)
    _exited(stack, "crashy", 1, "Segmentation fault")
    _stand_in(stack, "steady")
    assert launch.poll() == []
    assert said == ["  worker for model crashy: exited with code 1: Segmentation fault "
                    f"(see {stack.logs / 'worker-crashy.log'}); restarted 0 times in the last 60s, so not again: "
                    "requests for crashy are refused with model_unavailable if its worker could not load it, else "
                    "wait in its queue until they time out; the rest keeps serving (fix it, then restart govgate up)"]
    assert launch.given_up == {"crashy"} and launch.restart_due == {}
    assert launch.poll() == [] and len(said) == 1


def test_the_database_step_makes_the_admin_key_once(settings, tmp_path):
    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'up.db'}")
    env = child_env(own, own.redis_url)
    first = DatabaseStep(env, tmp_path / "database.log")
    secret = first.result()
    assert secret is not None and secret.startswith("gk_")
    assert DatabaseStep(env, tmp_path / "database.log").result() is None  # one admin key, made on the first run
    from gateway.auth import KeyStore
    from gateway.db_setup import open_database

    engine = open_database(own)
    try:
        assert KeyStore(engine).has_role("admin")
    finally:
        engine.dispose()


def test_an_unusable_database_is_one_line_naming_it(settings, tmp_path):
    own = settings.with_(database_url="nosuch://x")
    step = DatabaseStep(child_env(own, own.redis_url), tmp_path / "database.log")
    with pytest.raises(StartupError) as caught:
        step.result()
    message = str(caught.value)
    assert message.startswith(f"the database at {own.effective_database_url} cannot be used: ")
    assert "\n" not in message and "Traceback" not in message


def test_the_database_step_prints_one_json_line(settings, tmp_path):
    """The protocol :class:`DatabaseStep` reads: run as the supervisor runs it."""
    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'cli.db'}")
    result = subprocess.run([sys.executable, "-m", "govgate.admin_key"], env=child_env(own, own.redis_url),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)) == ["secret"]


class _StopsAtTheBanner:
    """A launcher whose API and first model are ready at once; the first poll once serving is a Ctrl-C."""

    def __init__(self, *_args: object) -> None:
        self.api_ready, self.ever_ready, self.serving, self.given_up = True, set(), False, set()

    def start_api(self) -> None:
        pass

    def start_worker(self, name: str) -> None:
        self.ever_ready.add(name)

    start_later = start_worker

    def poll(self) -> list[str]:
        if self.serving:
            os.kill(os.getpid(), signal.SIGINT)
        return []

    def elapsed(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


def test_a_ctrl_c_right_after_the_banner_still_shows_the_admin_key_it_made(settings, tmp_path, monkeypatch):
    """Stopping the database step instead could lose a committed admin key's secret for good."""
    import govgate.model_files
    import govgate.supervisor

    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'up.db'}")
    monkeypatch.setattr(govgate.supervisor, "Launcher", _StopsAtTheBanner)
    monkeypatch.setattr(govgate.model_files, "ensure_models", lambda *_args: None)
    out = io.StringIO()
    assert govgate.supervisor.run_up(own, out=out) == 0
    said = out.getvalue()
    assert "admin API key (shown once, keep it): gk_" in said, said
    assert said.index("admin API key") < said.index("govgate: stopping")


def test_a_worker_that_cannot_be_spawned_again_is_given_up_and_the_rest_keeps_running(launcher, monkeypatch):
    """The command gone under a running `govgate up` (its venv replaced): that model is given up, the API and the
    other models keep serving (the OSError used to leave run_up as "cannot start" and stop everything)."""
    from govgate import launcher as launcher_module

    launch, stack, said = launcher
    launch.serving = True
    launch.ever_ready.update({"tiny", "steady"})
    launch.policies["tiny"] = RestartPolicy(first_backoff_s=0)
    _exited(stack, "tiny", -9, "pid 7 loaded model tiny")
    _stand_in(stack, "steady")

    def gone(*_args, **_kwargs):
        raise FileNotFoundError(2, "No such file or directory", "/old/venv/bin/python")

    monkeypatch.setattr(launcher_module, "spawn_govgate", gone)
    launch.poll()  # decides to restart at once
    assert launch.poll() == []  # starts it: the spawn fails
    assert launch.given_up == {"tiny"} and launch.restart_due == {}
    assert said[-1].startswith("  worker for model tiny: cannot be started again (No such file or directory), so not "
                               "again: requests for tiny are refused with model_unavailable")
    assert stack.workers["steady"].poll() is None



def test_a_first_model_that_never_got_ready_is_given_up_for_the_next_until_none_is_left(launcher, monkeypatch):
    """During the start a model whose worker dies before it is ready is given up and the next cheapest is
    started in its place; ``up`` stops only when no model is left to try, naming the last reason and the
    models given up before it."""
    from govgate import launcher as launcher_module
    from govgate.launcher import NeverReady
    from govgate.supervisor import _next_first

    launch, stack, said = launcher
    started: list[str] = []
    monkeypatch.setattr(launch, "start_worker", started.append)
    _exited(stack, "broken", 1, "model broken cannot be served, the worker stops: not a GGUF file")
    launch.pending["broken"] = time.monotonic()
    with pytest.raises(NeverReady) as failed:
        launch.poll()
    later = ["cut", "tiny"]
    assert _next_first(launch, failed.value, later) == "cut"
    assert started == ["cut"] and later == ["tiny"] and launch.given_up == {"broken"}
    assert said[-1].startswith("  worker for model broken: exited with code 1: model broken cannot be served")
    assert said[-1].endswith("; it never got ready, so not again: " + launcher_module._UNSERVED.format(name="broken"))
    assert launch.poll() == [] and launch.pending == {}  # the given-up worker is not looked at again
    assert _next_first(launch, NeverReady("cut", "exited with code 1: bad"), later) == "tiny"
    with pytest.raises(StartupError, match=r"^worker tiny exited with code 1: bad; no model could be loaded "
                                           r"\(given up before it: broken, cut\)$"):
        _next_first(launch, NeverReady("tiny", "exited with code 1: bad"), later)


def test_a_restart_redis_refuses_is_tried_again_and_the_model_serves_once_redis_writes(own_redis, tmp_path,
                                                                                        monkeypatch):
    """h9 F2: a var dir filled for a moment makes Redis refuse writes (MISCONF); the restart's DEL of the stale
    ready key was taken for "the command cannot be run any more" and the model given up for good (and the
    process just spawned left behind). Here a real Redis refuses every write (``min-replicas-to-write`` with no
    replica, the same refusal path as MISCONF) until the test lets it write again."""
    from govgate import launcher as launcher_module

    spawned: list[subprocess.Popen] = []

    def stand_in_worker(args, env, log_file):  # the worker's command, as a process that never loads a model
        spawned.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=log_file))
        return spawned[-1]

    monkeypatch.setattr(launcher_module, "spawn_govgate", stand_in_worker)
    stack = Stack(logs=tmp_path)
    said: list[str] = []
    launch = Launcher(own_redis, stack, {}, own_redis.redis_url, said.append, time.monotonic())
    client = redis.Redis.from_url(own_redis.redis_url)
    try:
        launch.serving = True
        launch.ever_ready.add("tiny")
        launch.policies["tiny"] = RestartPolicy(first_backoff_s=0.01, max_backoff_s=0.05, max_restarts=1)
        _exited(stack, "tiny", 1, "Unrecoverable error: ResponseError('MISCONF Errors writing to the AOF file')")
        client.config_set("min-replicas-to-write", 1)
        with pytest.raises(redis.exceptions.ResponseError, match="NOREPLICAS"):
            client.delete("a-key")  # a real refusal
        deadline = time.monotonic() + 60
        while len([line for line in said if "Redis refused" in line]) < 3 and time.monotonic() < deadline:
            launch.poll()
            time.sleep(0.02)
        refused = [line for line in said if "Redis refused" in line]
        assert len(refused) >= 3, said
        assert refused[0].startswith("  worker for model tiny: not started: Redis refused a write (NOREPLICAS")
        assert "; trying again in " in refused[0]
        assert launch.given_up == set() and "tiny" in launch.restart_due
        assert spawned and all(proc.poll() is not None for proc in spawned)  # none left running
        client.config_set("min-replicas-to-write", 0)
        while "tiny" not in launch.pending and time.monotonic() < deadline:
            launch.poll()
            time.sleep(0.02)
        assert "tiny" in launch.pending and launch.given_up == set()
        assert stack.workers["tiny"] is spawned[-1] and spawned[-1].poll() is None
        assert said[-1].startswith("  worker for model tiny: starting (log: ")
        assert sum(proc.poll() is None for proc in spawned) == 1
    finally:
        client.config_set("min-replicas-to-write", 0)
        client.close()
        for proc in spawned:
            stop_process(proc, timeout_s=5)
        launch.close()


def test_a_log_cut_mid_line_is_quoted_by_its_last_whole_line(launcher):
    """h9 F2: a worker that died on a full disk left ``  File "/wor`` as its log's end, and ``up`` quoted that
    fragment as the reason; a whole line is quoted, and the cut is said (a full disk is a likely cause)."""
    launch, stack, said = launcher
    launch.serving = True
    launch.ever_ready.add("tiny")
    launch.policies["tiny"] = RestartPolicy(first_backoff_s=3600)
    _exited(stack, "tiny", 1, "Unrecoverable error: ResponseError('MISCONF')")
    with (stack.logs / "worker-tiny.log").open("a") as log:
        log.write('Traceback (most recent call last):\n  File "/wor')
    launch.poll()
    assert said[-1].startswith("  worker for model tiny: exited with code 1: Traceback (most recent call last): "
                               "(the log ends mid-line: a full disk?) (see "), said


def test_a_later_model_whose_first_start_redis_refuses_is_tried_again(own_redis, tmp_path, monkeypatch):
    """After the banner the later models are started; Redis refusing writes then used to stop the whole stack
    (the OSError reached run_up): the model's start is due again later and nothing of it is left running."""
    from govgate import launcher as launcher_module

    spawned: list[subprocess.Popen] = []

    def stand_in_worker(args, env, log_file):
        spawned.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=log_file))
        return spawned[-1]

    monkeypatch.setattr(launcher_module, "spawn_govgate", stand_in_worker)
    said: list[str] = []
    launch = Launcher(own_redis, Stack(logs=tmp_path), {}, own_redis.redis_url, said.append, time.monotonic())
    client = redis.Redis.from_url(own_redis.redis_url)
    try:
        launch.serving = True
        client.config_set("min-replicas-to-write", 1)
        launch.start_later("later")
        assert said == ["  worker for model later: not started: Redis refused a write (NOREPLICAS Not enough good "
                        "replicas to write.); trying again in 0.5s"], said
        assert "later" in launch.restart_due and launch.given_up == set() and "later" not in launch.pending
        assert len(spawned) == 1 and spawned[0].poll() is not None
    finally:
        client.config_set("min-replicas-to-write", 0)
        client.close()
        for proc in spawned:
            stop_process(proc, timeout_s=5)
        launch.close()


def test_a_worker_that_stopped_because_redis_refused_writes_is_started_again_without_counting_a_crash(
        launcher, monkeypatch):
    """A worker whose Redis refuses writes (MISCONF on a full disk) stops with EX_TEMPFAIL (75). That is no
    crash of its model: ``up`` starts it again after a wait, as it does a start Redis refused, and never gives
    the model up for it. Before, each such exit counted as a restart, so a Redis that refused writes now and
    then for a minute had the model given up for good after five."""
    import os

    launch, stack, said = launcher
    started: list[str] = []
    monkeypatch.setattr(launch, "start_worker", started.append)
    launch.serving = True
    launch.ever_ready.add("tiny")
    launch.policies["tiny"] = RestartPolicy(first_backoff_s=0.0, max_backoff_s=0.0, max_restarts=0)  # any crash: given up
    for _ in range(3):
        _exited(stack, "tiny", os.EX_TEMPFAIL, "model tiny: Redis refuses writes (MISCONF …); the worker stops")
        deadline = time.monotonic() + 30
        while len(started) < _ + 1 and time.monotonic() < deadline:
            launch.poll()
    assert launch.given_up == set() and started == ["tiny"] * 3, said
    assert said[0].startswith("  worker for model tiny: stopped: Redis refuses writes"), said
    assert "trying again in 0s" in said[0] and "restarting" not in said[0]
    _exited(stack, "tiny", 1, "Unrecoverable error: a real crash")
    launch.poll()
    assert launch.given_up == {"tiny"}  # a crash still counts


_API_STAND_IN = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: print("term", flush=True))  # drains: does not exit on the first
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))  # the second signal up passes on: exits
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("second, said_second", [(signal.SIGTERM, "a second SIGTERM"),
                                                 (signal.SIGINT, "Ctrl-C again")])
def test_the_stop_lines_name_the_signal_that_came_and_claim_no_requests_in_flight(second, said_second) -> None:
    """q1 (cosmetic): ``up`` said "Ctrl-C again" for a second SIGTERM, and "draining … for the requests in
    flight" when none was in flight (it cannot know how many are; the API logs that)."""
    api = subprocess.Popen([sys.executable, "-c", _API_STAND_IN], stdout=subprocess.PIPE, text=True)
    try:
        assert api.stdout is not None and api.stdout.readline().strip() == "ready"
        stack = Stack(api=api, api_stop_s=60.0, drain_s=20.0)
        stack.hurry(second)
        said: list[str] = []
        stack.stop(said.append)
        assert api.returncode == 0  # it got the SIGINT
        assert said[0] == "  api: stopping; requests still in flight, if any, get up to 20s (a second Ctrl-C " \
                          "or SIGTERM ends them now)", said
        assert said[1] == f"  api: {said_second}: its requests in flight, if any, are ended now", said
    finally:
        stop_process(api, timeout_s=5)


def test_a_worker_that_redis_refusing_writes_stops_during_the_start_fails_the_start_without_giving_models_up(
        launcher):
    """During the start a worker that exited 75 (its Redis refuses writes) was taken for a model that never got
    ready: ``up`` gave that model up ("so not again") and started the next cheapest, which met the same Redis,
    until no model was left. Redis is what fails, for every model: the start stops saying so, as it does when
    Redis refuses the launcher's own start of a worker (:class:`~govgate.launcher.NotStarted`)."""
    import os

    from govgate.launcher import NeverReady

    launch, stack, said = launcher
    _exited(stack, "tiny", os.EX_TEMPFAIL, "model tiny: Redis refuses writes (MISCONF Errors writing); the worker "
                                           "stops with exit code 75")
    launch.pending["tiny"] = time.monotonic()
    with pytest.raises(StartupError) as caught:
        launch.poll()
    assert not isinstance(caught.value, NeverReady), caught.value  # no model given up for Redis's state
    assert str(caught.value).startswith("worker for model tiny stopped: Redis refuses writes"), caught.value
    assert "MISCONF" in str(caught.value) and launch.given_up == set()
