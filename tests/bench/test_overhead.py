"""``bench/overhead.py`` and its helpers: the JSON shape the Performance issue asks for, and the probes.

The report is checked over made-up phases (exact keys, which round counts);
the probes over real processes (a reaped child's CPU stays in its role);
and one short real run checks that the whole bench produces that shape
against a real stack. No test here looks at a timing's value.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench._cpu import Role, RoleProbe
from bench._load import Phase
from bench.overhead import parse_args, run
from bench.overhead_report import GOVGATE_ROLES, SideRun, report, table

SIDE_KEYS = {"cpu_ms_per_request", "c1_p50_ms", "rps"}
GOVGATE_KEYS = SIDE_KEYS | {"non_2xx", "by_process", "redis_commands_per_request"}


def _phase(requests: int, wall_s: float, latency_ms: float, statuses: dict[str, int] | None = None) -> Phase:
    return Phase(requests=requests, concurrency=32, wall_s=wall_s, latencies_ms=[latency_ms] * requests,
                 statuses=Counter(statuses or {"200": requests}), client_cpu_s=0.01)


def _run(cpu_s: dict[str, float], c1_ms: float, statuses: dict[str, int] | None = None,
         commands: dict[str, int] | None = None) -> SideRun:
    return SideRun(c32=_phase(100, 1.0, 5.0, statuses), cpu_s=cpu_s, c1=_phase(10, 0.1, c1_ms),
                   commands=commands)


def _check_shape(document: dict) -> None:
    assert {"bare", "govgate", "ratios"} <= document.keys()
    assert SIDE_KEYS <= document["bare"].keys()
    assert GOVGATE_KEYS <= document["govgate"].keys()
    assert {"cpu", "c1_p50"} <= document["ratios"].keys()
    assert set(document["govgate"]["by_process"]) == set(GOVGATE_ROLES)
    json.dumps(document)  # writable as it is


def test_the_report_has_the_issue_shape_and_takes_each_side_from_its_better_round() -> None:
    gov_cpu = dict.fromkeys(GOVGATE_ROLES, 0.1)
    gov = [_run({**gov_cpu, "gateway": 0.5}, c1_ms=4.0, statuses={"200": 99, "503": 1},
                commands={"evalsha": 200, "get": 100}),
           _run(gov_cpu, c1_ms=6.0, commands={"evalsha": 300})]
    bare = [_run({"server": 0.05}, c1_ms=0.5), _run({"server": 0.04}, c1_ms=0.8)]
    document = report(gov, bare, {"requests": 100})
    _check_shape(document)
    g = document["govgate"]
    assert g["cpu_ms_per_request"] == 5.0  # the second round: 0.5 s over 100 requests
    assert g["redis_commands_per_request"] == 3.0 and g["redis_commands"] == {"evalsha": 3.0}  # same round
    assert g["c1_p50_ms"] == 4.0  # the lower c=1 p50, whichever round it came from
    assert g["non_2xx"] == 1  # a failure in any round counts
    assert document["bare"]["cpu_ms_per_request"] == 0.4
    assert document["ratios"] == {"cpu": 12.5, "c1_p50": 8.0, "rps": 1.0}
    assert "govgate / bare" in table(document)


def test_a_reaped_childs_cpu_stays_in_the_children_role_not_the_parents_own() -> None:
    import os

    me = os.getpid()
    probe = RoleProbe([Role("own", me, "own"), Role("children", me, "children"), Role("tree", me, "tree")])
    probe.start()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 0.3: pass"], check=True)
    spent = probe.stop()
    assert spent["children"] >= 0.2
    assert spent["own"] < spent["children"]
    assert abs(spent["own"] + spent["children"] - spent["tree"]) <= 0.02  # the split loses nothing (two ticks)


def test_quick_shrinks_a_run_and_bad_counts_are_refused() -> None:
    args = parse_args(["--quick"])
    assert args.requests <= 300 and args.c1_requests <= 50
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])


@pytest.mark.timeout(120)
def test_a_short_real_run_writes_the_issue_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "overhead.json"
    args = argparse.Namespace(requests=40, c1_requests=10, concurrency=8, warmup=8, rounds=2, quick=False, json=out)
    document = run(args)
    assert document is not None, capsys.readouterr().err
    _check_shape(json.loads(out.read_text()))
    assert document["govgate"]["statuses"].get("200", 0) > 0
    assert document["govgate"]["redis_commands_per_request"] > 0
