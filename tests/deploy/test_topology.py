"""The compose topology without containers: compose.yaml's services as processes on loopback.

Docker cannot run here, so this starts what ``docker compose up`` would —
Redis with the compose file's own ``redis-server`` arguments, PostgreSQL,
OPA on the mounted ``policies/``, two replicas of the gateway service and two
of the ``worker-tiny`` service (as ``--scale worker-tiny=2``) — each govgate
process with the environment its container would get (the image's ENV, the
env file's committed example, the service's ``environment``; read by
tests/deploy/compose_model.py). The only changes are the ones a container
runtime makes: a service name becomes a loopback address, a path inside the
container becomes the folder that is mounted there (a named volume is a
folder shared by the processes that mount it), and each replica has a port
and working folder of its own. A setting that names a host or path nothing
provides fails the test, so this proves the compose settings work together.

Then requests go through both gateways at once, allowed and denied, the
audit chain on PostgreSQL is one unbroken sequence that ``govgate audit
verify`` passes, and every health check compose.yaml declares is run against
the running processes (and seen to fail where it should).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import redis
from sqlalchemy.engine import make_url

from audit import AuditStore, make_engine
from govgate.opa_server import OpaServer
from govgate.processes import child_preexec, free_port, stop_process
from govgate.redis_server import PACKED_ENTRIES, find_redis_server
from tests.deploy.compose_model import ROOT, Service, load_compose, services
from tests.postgres_server import PostgresServer, find_bin_dir
from workers.contract.celery_config import make_celery

#: Where the image puts what its Dockerfile copies (WORKDIR /app).
IMAGE_PATHS = {"/app": ROOT}
GATEWAYS = 2
WORKERS = 2
START_TIMEOUT_S = 120


@dataclass
class Topology:
    """The running processes and where each compose name ended up on loopback."""

    folder: Path
    hosts: dict[str, tuple[str, int]] = field(default_factory=dict)
    database: str = ""
    database_user: tuple[str, str | None] = ("", None)
    volumes: dict[str, Path] = field(default_factory=dict)
    redis_url: str = ""
    redis_process: subprocess.Popen | None = None
    opa: OpaServer | None = None
    processes: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)

    def volume(self, name: str) -> Path:
        if name not in self.volumes:
            self.volumes[name] = self.folder / "volumes" / name
            self.volumes[name].mkdir(parents=True, mode=0o700)
        return self.volumes[name]

    def mount_table(self, service: Service, replica: Path) -> dict[str, Path]:
        """Container path -> folder or file here: the image's files, the service's mounts, its own var."""
        table = {target: source for target, source in IMAGE_PATHS.items()}
        table["/var/lib/govgate"] = replica / "var"  # the image's working folder, not a volume: per container
        for mount in service.mounts:
            table[mount.target] = self.volume(mount.source) if mount.named else mount.repo_path
        return table

    def local_path(self, value: str, table: dict[str, Path], what: str) -> str:
        for target in sorted(table, key=len, reverse=True):
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return str(table[target] / value[len(target):].lstrip("/"))
        raise AssertionError(f"{what}={value}: nothing is mounted there in compose.yaml or the image")

    def local_url(self, value: str, what: str) -> str:
        url = make_url(value) if value.startswith("postgresql") else None
        if url is not None:  # the database: its host, and the test's own database on that server
            assert url.host in self.hosts, f"{what}: {url.host} is not a service of compose.yaml"
            host, port = self.hosts[url.host]
            user, password = self.database_user
            return url.set(host=host, port=port, database=self.database, username=user,
                           password=password).render_as_string(hide_password=False)
        scheme, rest = value.split("://", 1)
        netloc, _, path = rest.partition("/")
        name, _, _ = netloc.rpartition("@")[2].partition(":")
        assert name in self.hosts, f"{what}: {name} is not a service of compose.yaml"
        host, port = self.hosts[name]
        return f"{scheme}://{host}:{port}" + (f"/{path}" if path else "")

    def container_env(self, service: Service, replica: Path, port: int | None = None) -> dict[str, str]:
        """The service's container environment, mapped onto this machine."""
        table = self.mount_table(service, replica)
        env = {}
        for key, value in service.environment.items():
            if not key.startswith("GOVGATE_"):
                continue
            if "://" in value:
                value = self.local_url(value, key)
            elif value.startswith("/"):
                value = self.local_path(value, table, key)
            env[key] = value
        if env.get("GOVGATE_MODELS_FILE"):
            env["GOVGATE_MODELS_FILE"] = self.registry_copy(Path(env["GOVGATE_MODELS_FILE"]), table)
        assert env.pop("GOVGATE_HOST", "0.0.0.0") == "0.0.0.0"  # the image listens on every interface...
        env["GOVGATE_HOST"] = "127.0.0.1"  # ... which on this machine is loopback
        if port is not None:
            env["GOVGATE_PORT"] = str(port)
        return env

    def registry_copy(self, registry: Path, table: dict[str, Path]) -> str:
        """The mounted registry with its container paths (the models volume) mapped like the settings."""
        copy = self.folder / "models.toml"
        if not copy.exists():
            text = re.sub(r'^(path\s*=\s*")([^"]+)(")',
                          lambda m: m.group(1) + self.local_path(m.group(2), table, "models path") + m.group(3),
                          registry.read_text(), flags=re.MULTILINE)
            copy.write_text(text)
        return str(copy)

    def spawn(self, label: str, service: Service, *, port: int | None = None) -> dict[str, str]:
        replica = self.folder / label
        replica.mkdir()
        env = self.container_env(service, replica, port)
        self.envs[label] = env
        log = replica / "out.log"
        child = {k: v for k, v in os.environ.items() if not k.startswith("GOVGATE_")}
        child.update(env, PYTHONPATH=str(ROOT))
        with open(log, "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "govgate.cli", *service.command], env=child,
                                       cwd=replica, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       preexec_fn=child_preexec())
        self.processes.append((label, process, log))
        return env

    def check_alive(self) -> None:
        for label, process, log in self.processes:
            if process.poll() is not None:
                raise AssertionError(f"{label} exited with {process.returncode}:\n{log.read_text()[-3000:]}")

    def run_cli(self, label: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``docker compose run --rm <service> <args>``: a one-off govgate command with a replica's env."""
        child = {k: v for k, v in os.environ.items() if not k.startswith("GOVGATE_")}
        child.update(self.envs[label], PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, "-m", "govgate.cli", *args], env=child, capture_output=True,
                              text=True, timeout=120, cwd=self.folder)

    def stop(self) -> None:
        for _, process, _ in reversed(self.processes):
            stop_process(process, timeout_s=30)
        if self.opa is not None:
            self.opa.stop()
        if self.redis_process is not None:
            stop_process(self.redis_process, timeout_s=10)


def _start_redis(topology: Topology, service: Service) -> None:
    """redis-server with the compose file's arguments, on a loopback port instead of the container's 6379."""
    command = service.command
    assert command[0] == "redis-server"
    port = free_port()
    data = topology.volume("redis-data")
    topology.redis_process = subprocess.Popen(
        [find_redis_server(), *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--daemonize", "no", "--logfile", str(data / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=child_preexec())
    topology.hosts["redis"] = ("127.0.0.1", port)
    topology.redis_url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(topology.redis_url)
    deadline = time.monotonic() + 30
    while True:
        assert topology.redis_process.poll() is None, (data / "redis.log").read_text()
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.05)
    client.close()


def _wait_for(topology: Topology, ready, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        topology.check_alive()
        assert time.monotonic() < deadline, f"{what} did not come up within {START_TIMEOUT_S}s"
        time.sleep(0.2)


def _workers_answering(redis_url: str, model: str) -> set[str]:
    app = make_celery(redis_url)
    try:
        return {name for reply in app.control.ping(timeout=1.0) or [] for name in reply
                if name.startswith(f"{model}.")}
    finally:
        app.close()


def _healthz(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def topology(postgres_server: PostgresServer, opa_binary: Path) -> Iterator[Topology]:
    compose = services(load_compose())
    folder = Path(tempfile.mkdtemp(prefix="gg-topo-"))
    topology = Topology(folder)
    database_url = postgres_server.fresh_database("topology")
    topology.database = make_url(database_url).database
    topology.database_user = (postgres_server.user, postgres_server.password)
    topology.hosts["postgres"] = (postgres_server.host, postgres_server.port)
    try:
        _start_redis(topology, compose["redis"])
        opa = compose["opa"]
        assert "--watch" in opa.command
        [policies] = [m for m in opa.mounts if m.target == opa.command[-1]]  # the folder OPA is told to load
        topology.opa = OpaServer(opa_binary, folder, policies.repo_path, watch=True).start()
        topology.hosts["opa"] = ("127.0.0.1", topology.opa.port)

        # Everything at once, as compose starts services whose dependencies are healthy: the
        # replicas race to migrate the database and to make the shared keys.
        model = compose["worker-tiny"].command[-1]
        for number in range(1, WORKERS + 1):
            topology.spawn(f"worker-tiny-{number}", compose["worker-tiny"])
        for number in range(1, GATEWAYS + 1):
            env = topology.spawn(f"gateway-{number}", compose["gateway"], port=free_port())
            topology.gateways.append(f"http://127.0.0.1:{env['GOVGATE_PORT']}")
        _wait_for(topology, lambda: len(_workers_answering(topology.redis_url, model)) >= WORKERS, "the workers")
        for base in topology.gateways:
            _wait_for(topology, lambda: _healthz(base), base)
        yield topology
    finally:
        topology.stop()
        postgres_server.drop_database(database_url)
        shutil.rmtree(folder, ignore_errors=True)


def _create_key(topology: Topology, user: str, role: str) -> str:
    created = topology.run_cli("gateway-1", "keys", "create", "--user", user, "--team", "ops", "--role", role)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


def _chat(base: str, key: str, content: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": "govgate-tiny", "messages": [{"role": "user", "content": content}],
                            "max_tokens": 8, "temperature": 0})


def test_requests_through_both_gateways_build_one_chain_that_verifies(topology: Topology) -> None:
    admin = _create_key(topology, "ada", "admin")  # as `docker compose run --rm gateway keys create`
    viewer = _create_key(topology, "vic", "viewer")
    plan = [(base, key, f"{who} via {base[-5:]} #{n}")
            for base in topology.gateways for n in range(2)
            for key, who in ((admin, "ada"), (viewer, "vic"))]
    with ThreadPoolExecutor(len(plan)) as pool:  # both gateways append to the chain at the same time
        replies = list(pool.map(lambda step: _chat(*step), plan))

    allowed = {}
    for (base, key, _), reply in zip(plan, replies):
        if key == admin:
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] is not None
            allowed[reply.headers["x-govgate-request-id"]] = base
        else:
            # the viewer may see no model: answered as an unknown one, audited as the denial
            assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found", reply.text
    assert set(allowed.values()) == set(topology.gateways), "both gateways must have served"
    denied = {r.headers["x-govgate-request-id"] for (_, key, _), r in zip(plan, replies) if key == viewer}

    verify = topology.run_cli("gateway-2", "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert re.search(r"^ok: \d+ entries, chain intact$", verify.stdout, re.MULTILINE), verify.stdout

    store = AuditStore(make_engine(topology.envs["gateway-1"]["GOVGATE_DATABASE_URL"]))
    try:
        entries = list(store.iter_entries())
        seqs = [entry.seq for entry in entries]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the chain has a gap"
        assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
        for request_id in allowed:
            assert [e.kind for e in store.entries_for(request_id)] == ["request", "completion"]
        for request_id in denied:
            [refusal] = store.entries_for(request_id)
            assert refusal.kind == "request" and refusal.body["decision"]["allow"] is False
    finally:
        store.engine.dispose()


def test_redis_runs_with_the_compose_files_durability_settings(topology: Topology) -> None:
    client = redis.Redis.from_url(topology.redis_url, decode_responses=True)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) > 0
        assert client.config_get("hash-max-ziplist-entries") == {"hash-max-ziplist-entries": PACKED_ENTRIES}
    finally:
        client.close()


def _run_check(test: list[str], env: dict[str, str] | None = None) -> int:
    kind, *command = test
    argv = ["sh", "-c", command[0]] if kind == "CMD-SHELL" else command
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, env=full_env, capture_output=True, timeout=60, cwd=ROOT).returncode


def _on_loopback(words: list[str], container_port: int, port: int) -> list[str]:
    return [w.replace(f"127.0.0.1:{container_port}", f"127.0.0.1:{port}") for w in words]


def test_every_health_check_of_compose_passes_on_the_topology_and_fails_without_its_service(
        topology: Topology, opa_binary: Path) -> None:
    compose = services(load_compose())

    # govgate's own checks: the script the image copies, run as the container would.
    script = ["python", "/app/deploy/healthcheck.py"]
    worker_test = compose["worker-tiny"].healthcheck_test
    assert worker_test[1:3] == script
    worker_env = topology.envs["worker-tiny-1"]
    as_here = [sys.executable, str(ROOT / "deploy" / "healthcheck.py")]
    assert _run_check(["CMD", *as_here, *worker_test[3:]], worker_env) == 0
    gemma_test = compose["worker-gemma"].healthcheck_test
    assert _run_check(["CMD", *as_here, *gemma_test[3:]], worker_env) == 1, "no gemma worker runs here"

    gateway_test = compose["gateway"].healthcheck_test
    assert gateway_test[1:3] == script
    for number, base in enumerate(topology.gateways, 1):
        port = int(topology.envs[f"gateway-{number}"]["GOVGATE_PORT"])
        url = _on_loopback(gateway_test[3:], 8080, port)
        ready = httpx.get(url[-1], timeout=10).status_code == 200  # /readyz (with OPS's split; 404 before it)
        assert _run_check(["CMD", *as_here, *url]) == (0 if ready else 1)
    assert _run_check(["CMD", *as_here, "gateway", f"http://127.0.0.1:{free_port()}/readyz"]) == 1

    # OPA's: the very command, with this machine's binary for the image's /opa.
    opa_test = compose["opa"].healthcheck_test
    assert opa_test[1] == "/opa"
    opa_here = ["CMD", str(opa_binary), *opa_test[2:]]
    assert _run_check(_on_loopback(opa_here, 8181, topology.opa.port)) == 0
    assert _run_check(_on_loopback(opa_here, 8181, free_port())) != 0

    # Redis's and PostgreSQL's, with their client tools pointed at the loopback ports.
    redis_host, redis_port = topology.hosts["redis"]
    redis_cli = str(Path(find_redis_server()).with_name("redis-cli"))
    [kind, shell] = compose["redis"].healthcheck_test
    assert _run_check([kind, shell.replace("redis-cli", f"{shlex.quote(redis_cli)} -h {redis_host} -p "
                                           f"{redis_port}")]) == 0
    assert _run_check([kind, shell.replace("redis-cli", f"{shlex.quote(redis_cli)} -p {free_port()}")]) != 0

    bin_dir = find_bin_dir()
    pg_host, pg_port = topology.hosts["postgres"]
    [kind, shell] = compose["postgres"].healthcheck_test
    pg_env = {**compose["postgres"].environment, "PGPORT": str(pg_port)}
    if bin_dir is not None:
        pg_env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    shell = shell.replace("$$", "$").replace("-h 127.0.0.1", f"-h {pg_host}")
    assert _run_check([kind, shell], pg_env) == 0
    assert _run_check([kind, shell], {**pg_env, "PGPORT": str(free_port())}) != 0
