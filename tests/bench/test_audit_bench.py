"""``bench/audit.py``: a short real run on both backends gives every figure, and the chains it wrote verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.postgres_server import PostgresServer


def test_a_short_run_measures_both_backends(tmp_path: Path, postgres_server: PostgresServer) -> None:
    out = tmp_path / "audit.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "audit.py"), "--appends", "40", "--json", str(out),
                          "--postgres-url", postgres_server.url("postgres").replace("+psycopg", "")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(out.read_text())
    assert set(document["backends"]) == {"sqlite", "postgresql"}
    for figures in document["backends"].values():
        assert figures["one_writer"]["appends"] == 40 and figures["one_writer"]["appends_per_s"] > 0
        assert figures["four_writers"]["appends"] == 40 and figures["four_writers"]["writers"] == 4
        assert figures["verify"]["entries"] == 41  # the four writers' appends and the chain_format boundary
    assert "sqlite" in run.stdout and "postgresql" in run.stdout
