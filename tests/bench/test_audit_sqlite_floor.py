"""``bench/audit_sqlite_floor.py``: a short real run measures every variant, and each variant is the schema it names."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from bench.audit_sqlite_floor import VARIANTS, Variant
from tests.conftest import ROOT


def test_a_short_run_reports_every_variant_against_the_shipped_schema(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "audit_sqlite_floor.py"), "--appends", "20",
                          "--rounds", "2", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(out.read_text())
    assert (document["appends_per_round"], document["rounds"]) == (20, 2)
    assert set(document["variants"]) == set(VARIANTS)
    assert document["variants"]["as shipped"]["vs_shipped"] == 1.0
    for name, figures in document["variants"].items():
        assert figures["cpu_ms_per_append"] > 0, name
    assert "as shipped" in run.stdout


def test_each_variant_is_the_schema_it_names_and_its_appends_land(tmp_path: Path) -> None:
    for i, (name, (statements, page_size, revision)) in enumerate(VARIANTS.items()):
        path = tmp_path / f"v{i}.db"
        variant = Variant(path, statements, page_size, revision)
        variant.append_round(4)
        variant.close()
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA page_size").fetchone() == (page_size,), name
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",), name
            assert conn.execute("SELECT count(*), max(seq) FROM audit_entries").fetchone() == (4, 4), name
            schema = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger')")}
            [(version,)] = conn.execute("SELECT version_num FROM alembic_version_audit").fetchall()
        finally:
            conn.close()
        assert version == (revision if revision != "head" else "audit_0007"), name
        dropped = {statement.split()[-1] for statement in statements if statement.startswith("DROP")}
        made = {statement.split()[2] for statement in statements if statement.startswith("CREATE")}
        assert not (dropped - made) & schema and made <= schema, name
        assert "audit_entries_no_delete" in schema and "ix_audit_entries_request_id" in schema, name
