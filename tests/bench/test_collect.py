"""``bench/collect.py``: the merged document keeps every bench's figures and the machine they came from."""

from __future__ import annotations

import json
from pathlib import Path

from bench.collect import collect, main


def test_present_files_are_merged_and_absent_or_broken_ones_are_named_missing(tmp_path: Path) -> None:
    (tmp_path / "overhead.json").write_text(json.dumps({"ratios": {"cpu": 3.0}}))
    (tmp_path / "policy.json").write_text("{not json")
    document = collect(["overhead", "policy", "startup"], tmp_path)
    assert document["benches"] == {"overhead": {"ratios": {"cpu": 3.0}}}
    assert document["missing"] == ["policy", "startup"]
    assert {"cpu_model", "cpu_cores", "ram_gib", "python", "git_commit", "date"} <= document["machine"].keys()
    assert document["machine"]["cpu_cores"] >= 1


def test_main_writes_latest_json_next_to_the_results(tmp_path: Path) -> None:
    (tmp_path / "ttft.json").write_text("{}")
    assert main(["--results", str(tmp_path), "ttft"]) == 0
    assert json.loads((tmp_path / "latest.json").read_text())["benches"] == {"ttft": {}}
