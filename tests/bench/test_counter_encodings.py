"""``bench/counter_encodings.py``: a short real run on two Redis servers of its own gives every figure, and the
two really differ in how they keep a moderately busy principal's counters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from govgate.redis_server import PACKED_ENTRIES
from tests.conftest import ROOT


def test_a_short_run_compares_redis_defaults_with_govgates_packing(tmp_path: Path) -> None:
    out = tmp_path / "counter_encodings.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "counter_encodings.py"), "--rates", "60,600",
                          "--blocks", "2", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(out.read_text())
    assert document["packed_entries"] == int(PACKED_ENTRIES) and document["blocks"] == 2
    assert [row["per_minute"] for row in document["rates"]] == [60, 600]
    for row in document["rates"]:
        assert set(row["redis_us"]) == {"redis defaults", "govgate"} and min(row["redis_us"].values()) > 0
        assert row["ratio"] > 0
    moderate, busy = document["rates"]
    # 60 a minute: some 130 fields in the hash, 60-odd members in the window; packed lists with Redis's
    # defaults (ziplist in Redis 6, listpack in 7), a hash table and a skip list with govgate's
    assert {moderate["encodings"]["redis defaults"][key] for key in ("hash", "window")} <= {"ziplist", "listpack"}
    assert moderate["encodings"]["govgate"] == {"hash": "hashtable", "window": "skiplist"}
    # 600 a minute: past either limit, the same on both
    assert busy["encodings"]["redis defaults"] == busy["encodings"]["govgate"] == {"hash": "hashtable",
                                                                                  "window": "skiplist"}
    assert "requests/min" in run.stdout
