"""Fixtures that run a real OPA server, for the tests of the OPA engine.

OPA is built by ``make opa`` into ``.tools/bin/opa`` (an ``opa`` on PATH
also does). Without one, the tests that need it skip and say how to get it;
with ``GOVGATE_TEST_REQUIRE_OPA=1`` (set by ``.ci/run``) they fail instead,
so CI cannot pass by skipping them.

Every server is a :class:`govgate.opa_server.OpaServer` (loopback, a free
port, ``--skip-version-check``), logs to a file under a temporary folder, and
is stopped by the fixture that started it. ``tests/conftest.py`` imports the
fixtures from here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from gateway.policy.opa_binary import LOCAL_OPA, find_opa
from govgate.opa_server import OpaServer  # noqa: F401  (the tests start their own through it)

ROOT = Path(__file__).resolve().parent.parent
POLICY_DIR = ROOT / "policies"
#: Set to 1 to make a missing binary a failure rather than a skip.
REQUIRE_OPA_ENV = "GOVGATE_TEST_REQUIRE_OPA"


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
