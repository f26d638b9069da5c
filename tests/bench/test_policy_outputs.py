"""``bench/policy_outputs.py`` runs end to end and writes every figure (their values are not looked at)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_a_short_run_writes_each_window_and_the_baseline(tmp_path: Path) -> None:
    out = tmp_path / "outputs.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "policy_outputs.py"), "--rounds", "1", "--calls", "20",
                          "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    document = json.loads(out.read_text())
    assert "request decision (policy bench mix)" in document["rules"]
    assert {"admin: clean 64 chars", "analyst: 256 chars with card (stop)"} <= document["rules"].keys()
    assert all(row["cpu_p50_us"] is not None for row in document["rules"].values())
    assert document["engine"].keys() == {"decide_output", "decide"}
    assert "cpu p50 / request" in run.stdout
