"""``bench/ops_overhead.py`` runs end to end and prints each figure (their values are not looked at)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_a_short_run_prints_every_figure():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "ops_overhead.py"), "--requests", "200",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    for figure in ("without the middleware", "hook policy decision timer", "hook audit append timer",
                   "hook tokens + queue wait", "extra CPU per completion", "one /metrics exposition"):
        assert figure in run.stdout, run.stdout
