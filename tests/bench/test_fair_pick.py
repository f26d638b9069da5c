"""``bench/fair_pick.py`` runs end to end on a Redis of its own and writes its figures (their values are not
looked at)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_a_short_run_times_the_pick_for_each_registry_size(tmp_path: Path) -> None:
    out = tmp_path / "pick.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "fair_pick.py"), "--lists", "4", "12", "--picks", "40",
                          "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    document = json.loads(out.read_text())
    assert [row["lists"] for row in document["rows"]] == [4, 12]
    for row in document["rows"]:
        assert row["picks"] == 40 and row["redis_us_per_pick"] > 0
        # one read of the registry and of the tags per pick, whatever the registry's size
        assert row["commands_per_pick"]["zrange"] == 1 and row["commands_per_pick"]["hmget"] == 1
        assert "hdel" not in row["commands_per_pick"]  # the waiting counts never ran down
    assert "Redis us/pick" in run.stdout


def test_a_registry_too_small_to_pop_and_correct_is_refused() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "fair_pick.py"), "--lists", "1"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 2 and "--lists at least 2" in run.stderr
