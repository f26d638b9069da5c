"""``deploy/haproxy.cfg`` passes HAProxy's own configuration check.

Docker cannot run here, so the load balancer in front of the gateway replicas
is never started; ``haproxy -c`` is the next best proof that the file the
``lb`` service mounts is one HAProxy accepts. The check skips where no
``haproxy`` binary is installed, unless ``GOVGATE_TEST_REQUIRE_HAPROXY=1``
(set by ``.ci/run``, which installs it), when it fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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
