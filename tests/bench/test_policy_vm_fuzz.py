"""``bench/policy_vm_fuzz.py`` finds a VM/interpreter difference, and none on the shipped policy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
FUZZ = ROOT / "bench" / "policy_vm_fuzz.py"

#: access.rego's team_allows as it was before the fuzzer found it walking a team's null `models`.
_GUARDED = "\tmodels = team_settings.models\n\tis_array(models)\n\tsome listed in models\n"
_UNGUARDED = "\tsome listed in team_settings.models\n"


def _fuzz(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FUZZ), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_the_shipped_policy_answers_alike_on_both(tmp_path: Path) -> None:
    out = tmp_path / "differences.jsonl"
    run = _fuzz("--seed", "7", "--count", "600", "--data-mutants", "4", "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^600 inputs compared in \d+ s: 0 differences", run.stdout, re.M), run.stdout
    for rule in ("decision", "output_decision", "visible_models"):
        assert f"{rule}: " in run.stdout  # each rule was asked (the interpreter's answers, counted)
    assert out.read_text() == ""


def test_a_team_with_null_models_is_found_and_shrunk(tmp_path: Path) -> None:
    """The difference the fuzzer found: a team `{"models": null}` failed the interpreter, not OPA or the VM."""
    folder = Path(shutil.copytree(ROOT / "policies", tmp_path / "policies"))
    access = folder / "access.rego"
    assert _GUARDED in access.read_text()
    access.write_text(access.read_text().replace(_GUARDED, _UNGUARDED))
    data = json.loads((folder / "data.json").read_text())
    data["govgate_config"]["teams"]["support"]["models"] = None
    (folder / "data.json").write_text(json.dumps(data))
    out = tmp_path / "differences.jsonl"
    run = _fuzz("--seed", "3", "--count", "400", "--data-mutants", "0", "--rule", "decision",
                "--policy-dir", str(folder), "--out", str(out))
    assert run.returncode == 1, run.stdout + run.stderr
    found = [json.loads(line) for line in out.read_text().splitlines()]
    # On the shipped data (support's models made null here), and on any case-table data with such a team.
    shipped = [record for record in found if record["data"] == "shipped"]
    assert shipped, found
    first = shipped[0]
    assert "some .. in collection" in first["interpreter"]["text"]
    assert first["vm"]["allow"] is False  # the VM answers (as OPA does); the input shrunk to the team alone
    assert first["input"]["principal"] == {"team": "support"}


def test_data_the_load_time_check_fails_on_is_reported(tmp_path: Path) -> None:
    """The other finding: an output detector entry without an action stopped config_problems ("not an object")."""
    folder = Path(shutil.copytree(ROOT / "policies", tmp_path / "policies"))
    checks = folder / "checks.rego"
    bound = '] := action if {\n\tsome name, entry in as_object(setting(["content", "output", "detectors"]))\n' \
            '\tis_object(entry)\n\taction = entry.action\n}'
    assert bound in checks.read_text()
    checks.write_text(checks.read_text().replace(bound, bound.replace("] := action", "] := entry.action")
                                                 .replace("\taction = entry.action\n", "")))
    data = json.loads((folder / "data.json").read_text())
    data["govgate_config"]["content"]["output"]["detectors"]["email"] = {}
    (folder / "data.json").write_text(json.dumps(data))
    out = tmp_path / "differences.jsonl"
    run = _fuzz("--seed", "3", "--count", "50", "--data-mutants", "0", "--policy-dir", str(folder), "--out", str(out))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "LOAD-TIME CHECK ERROR on data shipped: not an object" in run.stdout
    assert "1 data variants the load-time check failed on" in run.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["rule"], r["data"]) for r in records] == [("config_problems", "shipped")]
