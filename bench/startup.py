"""How fast does a warm ``govgate up`` serve, and how much memory does each process hold?

Runs ``govgate up`` (the built-in registry: the tiny model and the default
Gemma, unless ``--models-file`` names another) in a private folder and free
port. The first run is a preparation (it writes and assembles the models,
makes the database and an admin key) and is not measured; each later run is
a *warm start*: the time from spawning ``govgate up`` to the first
successful tiny-model completion, asked every 20 ms from the spawn on.

Once every model has said it is ready, it reads the resident memory
(``/proc/PID/status`` VmRSS) of every process of the stack: the supervisor
(``govgate up``), Redis, the API and its policy evaluators, and per model
the worker's main process and its pool process. A worker's *overhead beside
its model* is main + pool minus what the process holding the model (the pool
process; with ``GOVGATE_WORKER_POOL=solo`` the worker itself) maps of the
model file (``/proc/PID/smaps``). With ``--requests N`` it then sends N one-token
requests and reads the API's memory again (growth there means a cache
without bounds).

Figures move with whatever else the machine does: compare runs made back
to back. Nothing here asserts a timing.

Usage::

    .venv/bin/python bench/startup.py [--runs 3] [--requests 20000] [--json FILE] [--var-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

if not __package__:  # run as `python bench/startup.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._figures import write_json  # noqa: E402
from bench._stack import BENCH_PRINCIPAL, BENCH_TEAM, HOST, ROOT, bench_policy_dir, free_port, say  # noqa: E402

TINY = "govgate-tiny"
#: The longest one start may take before the run counts as failed.
START_TIMEOUT_S = 300.0
#: How often the client asks for the first completion.
ASK_INTERVAL_S = 0.02


class Up:
    """A ``govgate up`` child whose output lines are collected as they come."""

    def __init__(self, env: dict[str, str], log: Path, checkout: Path = ROOT) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "govgate.cli", "up"], env=env, cwd=checkout,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._log = log.open("a")
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            self.lines.put(line.rstrip("\n"))

    def drain(self) -> None:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return

    def wait_for(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout_s
        for line in self.seen:
            if match := re.search(pattern, line):
                return match
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    raise RuntimeError("govgate up exited:\n" + "\n".join(self.seen[-20:]))
                continue
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        raise RuntimeError(f"no line matching {pattern!r}:\n" + "\n".join(self.seen[-20:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


# ---------------------------------------------------------------- memory


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def cpu_s(root: int) -> float:
    """CPU seconds spent so far by ``root`` and every process under it (children that ended count
    once waited for: ``cutime``/``cstime``).

    On a machine shared with other jobs the wall-clock start time swings by
    seconds from run to run; the CPU a start needs does not.
    """
    tree, total, todo = _children(), 0, [root]
    ticks = os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        try:
            fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
        todo.extend(tree.get(pid, []))
    return total / ticks


def cpu_by_process(up_pid: int) -> dict[str, float]:
    """CPU seconds so far of the supervisor and of each child of it with what runs under it."""
    figures = {"supervisor": _own_cpu_s(up_pid)}
    for pid in _children().get(up_pid, []):
        cmd = _cmdline(pid)
        role = ("redis" if any("redis-server" in part for part in cmd[:1]) else "api" if "serve" in cmd
                else f"worker_{cmd[cmd.index('--model') + 1]}" if "--model" in cmd else f"other_{pid}")
        figures[role] = round(cpu_s(pid), 2)
    return figures


def _own_cpu_s(pid: int) -> float:
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return round(sum(int(value) for value in fields[11:13]) / os.sysconf("SC_CLK_TCK"), 2)


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (0 if it is gone)."""
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size of ``pid`` in MB: pages shared with other processes count by share.

    VmRSS counts a page the pool process shares with its worker's main
    process (after fork) in both; summing PSS counts it once.
    """
    try:
        for line in (Path("/proc") / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def mapped_mb(pid: int, suffixes: tuple[str, ...]) -> float:
    """Resident MB of ``pid``'s mappings of files whose path ends with one of ``suffixes``."""
    total_kb, counting = 0, False
    try:
        text = (Path("/proc") / str(pid) / "smaps").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            counting = len(head) >= 6 and head[-1].endswith(suffixes)
        elif counting and head and head[0] == "Rss:":
            total_kb += int(head[1])
    return total_kb / 1024


def memory(up_pid: int) -> dict[str, float]:
    """MB per process of the stack under ``up_pid``, and each worker's overhead beside its model."""
    tree = _children()
    figures = {"supervisor": rss_mb(up_pid)}
    for pid in tree.get(up_pid, []):
        cmd = _cmdline(pid)
        if any("redis-server" in part for part in cmd[:1]):
            figures["redis"] = rss_mb(pid)
        elif "serve" in cmd:
            figures["api"] = rss_mb(pid)
            evaluators = tree.get(pid, [])
            figures["api_evaluators"] = sum(rss_mb(child) for child in evaluators)
            figures["api_evaluator_count"] = len(evaluators)
        elif "worker" in cmd:
            name = cmd[cmd.index("--model") + 1]
            # prefork: the pool process(es) hold the model; solo (no child but the store's, gone by now): the main
            pool = tree.get(pid, [])
            main, children = rss_mb(pid), sum(rss_mb(child) for child in pool)
            model = sum(mapped_mb(p, (".gguf", ".bin", ".ggml")) for p in (pool or [pid]))
            figures[f"worker_{name}_main"] = main
            figures[f"worker_{name}_pool"] = children
            figures[f"worker_{name}_model_mapped"] = model
            figures[f"worker_{name}_overhead"] = main + children - model
            figures[f"worker_{name}_overhead_pss"] = pss_mb(pid) + sum(pss_mb(c) for c in pool) - model
    return {key: round(value, 1) for key, value in figures.items()}


# ---------------------------------------------------------------- requests


def first_completion(base: str, key: str, started: float) -> float:
    """Seconds from ``started`` to the first 200 from a one-token tiny-model completion."""
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    with httpx.Client(timeout=httpx.Timeout(60, connect=0.5)) as client:
        while time.monotonic() - started < START_TIMEOUT_S:
            try:
                reply = client.post(f"{base}/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {key}"})
                if reply.status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(ASK_INTERVAL_S)
    raise RuntimeError("no completion within the start timeout")


async def _load(base: str, key: str, count: int, concurrency: int) -> tuple[int, int]:
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    left, ok, failed = count, 0, 0

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal left, ok, failed
        while left > 0:
            left -= 1
            try:
                reply = await client.post("/v1/chat/completions", json=body)
                ok, failed = (ok + 1, failed) if reply.status_code == 200 else (ok, failed + 1)
            except httpx.HTTPError:
                failed += 1

    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(one(client) for _ in range(concurrency)))
    return ok, failed


# ---------------------------------------------------------------- runs


def prepare(var_dir: Path, env: dict[str, str]) -> str:
    """One unmeasured start that makes the models and the database; an admin key without limits."""
    up = Up(env, var_dir / "up.log")
    try:
        up.wait_for(r"Ctrl-C stops everything")
        models = _model_names(up)
        for name in models:
            up.wait_for(rf"model {re.escape(name)}: ready")
    finally:
        up.stop()
    from gateway.auth import KeyStore
    from gateway.db_setup import open_database
    from gateway.settings import Settings

    engine = open_database(Settings.from_env(env))
    try:
        return KeyStore(engine).create(BENCH_PRINCIPAL, team=BENCH_TEAM, roles=["admin"],
                                       note="bench/startup.py").secret
    finally:
        engine.dispose()


def _model_names(up: Up) -> list[str]:
    up.drain()
    names = [m.group(1) for line in up.seen if (m := re.search(r"model (\S+): (ready|starting now)", line))]
    return list(dict.fromkeys(names))


def warm_run(var_dir: Path, env: dict[str, str], key: str, base: str, requests: int, checkout: Path) -> dict:
    started = time.monotonic()
    up = Up(env, var_dir / "up.log", checkout)
    try:
        first = first_completion(base, key, started)
        cpu_at_first = cpu_s(up.process.pid)
        cpu_parts = cpu_by_process(up.process.pid)
        up.wait_for(r"Ctrl-C stops everything")
        names = _model_names(up)
        for name in names:
            up.wait_for(rf"model {re.escape(name)}: ready")
        all_ready = time.monotonic() - started
        time.sleep(1.0)  # let the children settle after the last load
        result = {"first_completion_s": round(first, 2), "cpu_s_to_first_completion": round(cpu_at_first, 2),
                  "cpu_s_by_process_at_first_completion": cpu_parts, "all_models_ready_s": round(all_ready, 2),
                  "rss_mb": memory(up.process.pid)}
        if requests:
            ok, failed = asyncio.run(_load(base, key, requests, 16))
            result["requests"] = {"ok": ok, "failed": failed}
            result["api_rss_after_requests_mb"] = round(rss_mb(_api_pid(up.process.pid)), 1)
        return result
    finally:
        up.stop()


def _api_pid(up_pid: int) -> int:
    return next(pid for pid in _children().get(up_pid, []) if "serve" in _cmdline(pid))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="warm starts to measure")
    parser.add_argument("--requests", type=int, default=0, help="one-token requests after the last start")
    parser.add_argument("--models-file", type=Path, help="a registry file instead of the built-in one")
    parser.add_argument("--var-dir", type=Path, help="keep the folder (and its models) between invocations")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--worker-pool", choices=("prefork", "solo"),
                        help="GOVGATE_WORKER_POOL of the workers (default: the setting's default)")
    parser.add_argument("--checkout", type=Path, default=ROOT,
                        help="run the measured starts from this checkout (to compare two versions back to back)")
    args = parser.parse_args()
    args.checkout = args.checkout.resolve()

    var_dir = args.var_dir or Path(tempfile.mkdtemp(prefix="ggs-", dir="/tmp"))
    var_dir.mkdir(parents=True, exist_ok=True)
    port = free_port(HOST)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVGATE_")}
    env["PYTHONPATH"] = str(args.checkout)
    env.update({"GOVGATE_VAR_DIR": str(var_dir), "GOVGATE_HOST": HOST, "GOVGATE_PORT": str(port),
                "GOVGATE_POLICY_DIR": str(bench_policy_dir(var_dir) if not (var_dir / "policies").exists()
                                          else var_dir / "policies")})
    if args.models_file:
        env["GOVGATE_MODELS_FILE"] = str(args.models_file.resolve())
    if args.worker_pool:
        env["GOVGATE_WORKER_POOL"] = args.worker_pool
    base = f"http://{HOST}:{port}"
    try:
        say(f"startup: preparing {var_dir} (models, database, key) …")
        key = prepare(var_dir, env)
        runs = []
        for number in range(args.runs):
            last = number == args.runs - 1
            run = warm_run(var_dir, env, key, base, args.requests if last else 0, args.checkout)
            say(f"startup: run {number + 1}: first completion after {run['first_completion_s']:.2f}s "
                f"({run['cpu_s_to_first_completion']:.1f} CPU-s), "
                f"all models ready after {run['all_models_ready_s']:.2f}s")
            runs.append(run)
    finally:
        if not args.var_dir:
            shutil.rmtree(var_dir, ignore_errors=True)

    firsts = [run["first_completion_s"] for run in runs]
    cpus = [run["cpu_s_to_first_completion"] for run in runs]
    summary = {"runs": runs, "first_completion_median_s": round(statistics.median(firsts), 2),
               "cpu_s_to_first_completion_median": round(statistics.median(cpus), 2),
               "rss_mb_last_run": runs[-1]["rss_mb"]}
    print(f"warm start to first tiny completion: median {summary['first_completion_median_s']:.2f}s "
          f"(runs: {', '.join(f'{s:.2f}' for s in firsts)}; load average {os.getloadavg()[0]:.1f})")
    print(f"CPU-seconds of all its processes until then: median {summary['cpu_s_to_first_completion_median']:.1f} "
          f"(runs: {', '.join(f'{s:.1f}' for s in cpus)})")
    print("CPU-seconds by process at the first completion (last run): "
          + ", ".join(f"{name} {value}" for name, value in runs[-1]["cpu_s_by_process_at_first_completion"].items()))
    print("resident memory, MB (last run):")
    for name, value in runs[-1]["rss_mb"].items():
        print(f"  {name:<40} {value:>8}")
    if "api_rss_after_requests_mb" in runs[-1]:
        print(f"  api after {args.requests} requests ({runs[-1]['requests']}): "
              f"{runs[-1]['api_rss_after_requests_mb']} MB")
    if args.json:
        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
