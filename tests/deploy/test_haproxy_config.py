"""``deploy/haproxy.cfg`` passes HAProxy's own configuration check.

Docker cannot run here, so the load balancer in front of the gateway replicas
is never started; ``haproxy -c`` is the next best proof that the file the
``lb`` service mounts is one HAProxy accepts. The check skips where no
``haproxy`` binary is installed, unless ``GOVGATE_TEST_REQUIRE_HAPROXY=1``
(set by ``.ci/run``, which installs it), when it fails instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from gateway.settings import Settings
from govgate.processes import free_port, stop_process
from tests.conftest import serving

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "haproxy.cfg"
REQUIRE_ENV = "GOVGATE_TEST_REQUIRE_HAPROXY"


@pytest.fixture(scope="module")
def haproxy() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if found is None:
        message = "no haproxy binary (apt-get install haproxy)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message}; {REQUIRE_ENV}=1 requires it")
        pytest.skip(message)
    return found


def _check(haproxy: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)


def test_the_shipped_config_is_valid(haproxy: str) -> None:
    result = _check(haproxy, CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_config_is_refused(haproxy: str, tmp_path: Path) -> None:
    # The check above proves something only if haproxy -c rejects a bad file.
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(CONFIG.read_text() + "\nbackend broken\n    balance no-such-algorithm\n")
    result = _check(haproxy, broken)
    assert result.returncode != 0


def _local_config(tmp_path: Path, port: int, servers: list[int], *, round_robin: bool = False) -> Path:
    """The shipped file, run here: Docker's DNS and the server template replaced by ``servers`` on loopback
    (each with the template's own check settings, at ``/healthz``), bound to ``port`` on loopback; with ``round_robin`` its
    ``leastconn`` replaced, so that requests one at a time reach every replica (``leastconn`` sends them all
    to the same one while none is busy)."""
    # The suite's gateways name models no worker serves, so their /readyz is 503: checked at /healthz here.
    text = CONFIG.read_text().replace("option httpchk GET /readyz", "option httpchk GET /healthz")
    if round_robin:
        text = re.sub(r"^([ \t]*)balance leastconn$", r"\1balance roundrobin", text, flags=re.MULTILINE)
    text = re.sub(r"^resolvers docker\n(?:[ \t]+.*\n)+", "", text, flags=re.MULTILINE)
    [template] = re.findall(r"^[ \t]*server-template \S+ \d+ \S+ (.*)$", text, flags=re.MULTILINE)
    checks = template.replace("resolvers docker", "").replace("init-addr none", "").strip()
    lines = "\n".join(f"    server replica{i} 127.0.0.1:{p} {checks}" for i, p in enumerate(servers))
    text = re.sub(r"^[ \t]*server-template .*$", lines, text, flags=re.MULTILINE)
    text = re.sub(r"^([ \t]*)bind :8080$", rf"\1bind 127.0.0.1:{port}", text, flags=re.MULTILINE)
    text = text.replace("log stdout format raw local0 warning", f"stats socket {tmp_path / 'admin.sock'} level admin")
    local = tmp_path / "haproxy.cfg"
    local.write_text(text)
    return local


@contextlib.contextmanager
def _balancing(haproxy: str, config: Path, port: int) -> Iterator[str]:
    process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "haproxy did not listen"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _check_health(sock: Path, server: str) -> int:
    """The health counter HAProxy keeps for ``server`` (``show servers state``): a replica whose checks
    have all passed holds rise + fall - 1, and goes down after ``fall`` failures. 0 while HAProxy has not
    made its admin socket yet (it may listen on its port first: seen once on a busy machine)."""
    with socket.socket(socket.AF_UNIX) as conn:
        try:
            conn.connect(str(sock))
        except (FileNotFoundError, ConnectionRefusedError):
            return 0
        conn.sendall(b"show servers state gateways\n")
        answer = b"".join(iter(lambda: conn.recv(65536), b"")).decode()
    header, *rows = [line.split() for line in answer.splitlines() if line and not line.startswith("1")]
    names = header[1:]  # "# be_id be_name srv_id srv_name ..."
    for row in rows:
        state = dict(zip(names, row))
        if state.get("srv_name") == server:
            return int(state["srv_check_health"])
    raise AssertionError(f"{server} not in {answer!r}")


def test_a_replica_that_has_just_exited_is_passed_over_not_answered_with_haproxy_s_html(
        haproxy: str, served_api: str, settings: Settings, tmp_path: Path) -> None:
    """Probe r1 F2: a replica that exited (its drain done, or killed) was still sent requests until its
    health checks failed ``fall`` times, and with no retry elsewhere HAProxy answered its own HTML 503 ("No
    server is available"): no OpenAI shape, no Retry-After, nothing audited. A connection refused is now
    tried on the other replica. Two real gateways behind the shipped file's settings; once the load
    balancer holds the leaving one fully healthy, it is killed and requests follow at once."""
    import httpx

    port = free_port()
    live = int(served_api.rsplit(":", 1)[1])
    config = _local_config(tmp_path, port, [0, live], round_robin=True)
    checks = re.search(r"rise (\d+)", config.read_text()), re.search(r"fall (\d+)", config.read_text())
    healthy = int(checks[0].group(1)) + int(checks[1].group(1)) - 1
    with serving(settings, tmp_path / "leaving.log") as leaving:
        config.write_text(config.read_text().replace("127.0.0.1:0 ", f"127.0.0.1:{leaving.rsplit(':', 1)[1]} "))
        with _balancing(haproxy, config, port) as url:
            deadline = time.monotonic() + 60
            while _check_health(tmp_path / "admin.sock", "replica0") < healthy:
                assert time.monotonic() < deadline, "the leaving replica never became fully healthy"
                time.sleep(0.2)
            leaving.process.kill()
            leaving.process.wait(30)
            answers = [httpx.get(f"{url}/healthz", timeout=30) for _ in range(8)]  # before the checks notice
    assert [a.status_code for a in answers] == [200] * 8, [(a.status_code, a.text[:80]) for a in answers]


def test_with_no_replica_the_load_balancer_answers_in_openai_s_error_shape(haproxy: str, tmp_path: Path) -> None:
    """The load balancer's own 503 (no replica ready) is JSON in OpenAI's error shape with a Retry-After, as
    the gateway's own refusals are, not HAProxy's HTML page (probe r1 F2)."""
    import httpx

    port = free_port()
    with _balancing(haproxy, _local_config(tmp_path, port, [free_port()]), port) as url:
        answer = httpx.post(f"{url}/v1/chat/completions", json={}, timeout=60)
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/json" and answer.headers["retry-after"] == "2"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "no_replica_ready", error
