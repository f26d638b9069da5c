"""``bench/policy_rvm.py`` runs end to end and writes every figure (their values are not looked at)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_a_short_run_compares_both_evaluators_on_both_questions(tmp_path: Path) -> None:
    out = tmp_path / "rvm.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "policy_rvm.py"), "--rounds", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    document = json.loads(out.read_text())
    assert document["figures"].keys() == {"data.govgate.decision", "data.govgate.output_decision"}
    for row in document["figures"].values():
        assert row["interpreter"]["cpu_p50_us"] is not None and row["rvm"]["cpu_p50_us"] is not None
    assert document["bench_inputs"] >= 20 and document["cases"] >= 100
    assert "of the case table" in run.stdout


def test_a_policy_the_compiler_refuses_is_reported_not_crashed_on(tmp_path: Path) -> None:
    """A partial object rule with constant keys (what limits.rego's scope_limits was) stops the compiler."""
    (tmp_path / "p.rego").write_text('package govgate\n\nimport rego.v1\n\nscopes["a"] := 1\n\n'
                                     'decision := scopes\n\noutput_decision := scopes\n')
    (tmp_path / "data.json").write_text("{}")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "policy_rvm.py"), "--rounds", "1",
                          "--policy-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 1
    assert "the RVM compiler refuses the policy" in run.stdout
    assert "partial object rules with constant keys" in run.stdout
