"""Fixtures that run a real OPA server, for the tests of the OPA engine.

OPA is built by ``make opa`` into ``.tools/bin/opa`` (an ``opa`` on PATH
also does). Without one, the tests that need it skip and say how to get it;
with ``GOVGATE_TEST_REQUIRE_OPA=1`` (set by ``.ci/run``) they fail instead,
so CI cannot pass by skipping them.

Every server listens on 127.0.0.1 on a free port, runs with
``--skip-version-check`` (OPA otherwise asks GitHub for its latest release),
logs to a file under a temporary folder, and is stopped by the fixture that
started it. ``tests/conftest.py`` imports the fixtures from here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from gateway.policy.opa_binary import LOCAL_OPA, find_opa

ROOT = Path(__file__).resolve().parent.parent
POLICY_DIR = ROOT / "policies"
#: Set to 1 to make a missing binary a failure rather than a skip.
REQUIRE_OPA_ENV = "GOVGATE_TEST_REQUIRE_OPA"

_START_TIMEOUT_S = 20.0
_PORT_ATTEMPTS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OpaServer:
    """One ``opa run --server`` child process on loopback."""

    def __init__(self, binary: Path, log_dir: Path, *paths: Path, watch: bool = False) -> None:
        self.binary = binary
        self.paths = paths
        self.watch = watch
        self.log_path = log_dir / f"opa-{id(self):x}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OpaServer":
        """Start and wait for ``/health``; a port taken between choosing and binding is retried."""
        for _ in range(_PORT_ATTEMPTS):
            self.port = _free_port()
            command = [str(self.binary), "run", "--server", "--addr", f"127.0.0.1:{self.port}",
                       "--log-level", "error", "--skip-version-check", *(["--watch"] if self.watch else []),
                       *map(str, self.paths)]
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            if self._wait_healthy():
                return self
            self.stop()
            if "address already in use" not in self.log():
                break
        raise RuntimeError(f"OPA did not start ({' '.join(command)}):\n{self.log()[-2000:]}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False


@pytest.fixture(scope="session")
def opa_binary() -> Path:
    """The opa binary; skips (or fails, in CI) when there is none."""
    binary = find_opa()
    if binary is None:
        message = f"no opa binary: run `make opa` (looked for {LOCAL_OPA.relative_to(ROOT)} and opa on PATH)"
        if os.environ.get(REQUIRE_OPA_ENV) == "1":
            pytest.fail(f"{message}; {REQUIRE_OPA_ENV}=1 requires it")
        pytest.skip(message)
    return binary


@pytest.fixture(scope="session")
def opa_log_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gg-opa-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def opa_server(opa_binary: Path, opa_log_dir: Path) -> Iterator[str]:
    """URL of an OPA started empty and shared by the session: load what a test needs."""
    server = OpaServer(opa_binary, opa_log_dir).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def opa_policy_server(opa_binary: Path, opa_log_dir: Path) -> Iterator[str]:
    """URL of an OPA that loaded ``policies/`` itself, as ``opa run --server /policies`` in production."""
    server = OpaServer(opa_binary, opa_log_dir, POLICY_DIR).start()
    yield server.url
    server.stop()


@pytest.fixture
def start_opa(opa_binary: Path, opa_log_dir: Path) -> Iterator[Callable[..., OpaServer]]:
    """Start private OPA servers (``start_opa(*paths)``) for tests that stop or empty them."""
    servers: list[OpaServer] = []

    def start(*paths: Path, watch: bool = False) -> OpaServer:
        server = OpaServer(opa_binary, opa_log_dir, *paths, watch=watch)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
