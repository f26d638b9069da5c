"""``bench/audit.py``: a short real run on both backends gives every figure, and the stores it reads are sound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from audit import AuditStore, make_engine, verify_chain
from audit.kinds import COMPLETION, PAYLOAD_READ, REQUEST, REVIEW_KINDS
from bench._audit_store import open_store
from tests.conftest import ROOT
from tests.postgres_server import PostgresServer

READS = {"team", "principal", "model", "kind_and_reason", "denied", "time_range_one_day", "team_and_time_range",
         "team_page_20", "story", "free_text_common", "free_text_rare", "usage_one_day", "usage_30_days"}
TARGETS = {"sqlite_one_writer_appends_per_s", "verify_entries_per_s", "filtered_search_p50_ms",
           "export_constant_memory"}


def test_a_short_run_measures_both_backends_and_the_large_store(tmp_path: Path,
                                                               postgres_server: PostgresServer) -> None:
    out = tmp_path / "audit.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "audit.py"), "--appends", "40", "--json", str(out),
                          "--entries", "13000", "--repeats", "2", "--store-folder", str(tmp_path),
                          "--postgres-url", postgres_server.url("postgres").replace("+psycopg", "")],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(out.read_text())
    assert set(document["backends"]) == {"sqlite", "postgresql"}
    for figures in document["backends"].values():
        assert figures["one_writer"]["appends"] == 40 and figures["one_writer"]["appends_per_s"] > 0
        assert figures["one_writer"]["rounds"] >= 1 and figures["one_writer"]["cpu_ms_per_append"] > 0
        assert figures["threads_one_process"]["appends"] == 40 and figures["threads_one_process"]["threads"] == 8
        assert figures["threads_one_process"]["appends_per_s"] > 0
        assert figures["four_writers"]["appends"] == 40 and figures["four_writers"]["writers"] == 4
        assert figures["verify"]["entries"] == 41  # the four writers' appends and the chain_format boundary
    large = document["large_store"]
    assert large["entries"] == 13000 and large["built_s"] > 0  # built in tmp_path, not taken from the cache
    assert set(large["reads"]) == READS
    for name, figures in large["reads"].items():
        assert 0 < figures["p50_ms"] <= figures["p99_ms"], name
        assert figures["runs"] >= 2
    assert set(large["verify"]) == {"entries", "workers", "runs", "load_average", "entries_per_s",
                                    "entries_per_s_one_process", "cpu_us_per_entry", "cpu_us_per_entry_one_process"}
    assert large["verify"]["entries"] == 13000 and large["verify"]["workers"] >= 1
    assert large["verify"]["entries_per_s"] > 0 and large["verify"]["entries_per_s_one_process"] > 0
    assert large["verify"]["cpu_us_per_entry"] > 0 and large["verify"]["cpu_us_per_entry_one_process"] > 0
    for fmt in ("jsonl", "csv"):
        part, whole = large["export"][fmt]["part"], large["export"][fmt]["whole"]
        assert (part["entries"], whole["entries"]) == (1300, 13000)
        assert 0 < part["mb"] < whole["mb"] and whole["mb_per_s"] > 0
        assert whole["peak_rss_mib"] >= whole["rss_before_mib"] > 0
    assert set(document["targets"]) == TARGETS
    for target in document["targets"].values():
        assert isinstance(target["met"], bool) and target["figure"] is not None
    assert "sqlite" in run.stdout and "postgresql" in run.stdout and "targets" in run.stdout


def test_the_built_store_is_the_chain_the_store_would_write_and_is_reused(tmp_path: Path) -> None:
    store = open_store(3000, folder=tmp_path, log=lambda line: None)
    assert store.built_s is not None
    audit = AuditStore(make_engine(store.url))
    result = verify_chain(audit)
    assert result.ok and result.checked == 3000, result
    kinds = {entry.kind for entry in audit.iter_entries()}
    assert {REQUEST, COMPLETION} <= kinds and kinds & (REVIEW_KINDS | {PAYLOAD_READ})
    for request_id in store.sample_request_ids:
        assert audit.entries_for(request_id), request_id
    # The product's own append goes on top of it, and the chain still verifies: the head is a real head.
    audit.append("request", "after-the-bench", principal="p", team="t", model="m", body={"k": 1},
                 payload={"prompt": "hello"}, policy_revision=None)
    again = verify_chain(audit)
    assert again.ok and again.checked == 3001, again
    audit.engine.dispose()
    assert open_store(3000, folder=tmp_path, log=lambda line: None).built_s is None  # reused, not rebuilt
