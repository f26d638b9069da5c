"""``bench/fairness.py``: its arithmetic over made-up schedules, and one short real run's JSON shape and counts.

The figures' definitions (slots, backlog, shares, throughput) are checked on
hand-made jobs whose answers are known; the real run checks that every
request sent was answered 200 and ended as a completion in the audit, and
that the document has the issue's shape. No test here looks at a timing's
value, nor claims fair share beats FIFO: that is what the bench reports.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench._fairness_figures import (
    Answer,
    Job,
    admissions_ms,
    backlogged_shares,
    handovers_ms,
    job_from_entry,
    latencies_ms,
    overall_shares,
    passed_waits_ms,
    schedule,
    service_ms,
    share_error,
    throughput,
    timeline,
)
from bench._fairness_stack import fair_mode_available
from bench._fairness_report import MODES, PhaseRun, report, table
from bench.fairness import SCENARIOS, parse_args, run, schedules

HEADLINE_KEYS = {"b_wait_p50_ms", "b_wait_p95_ms", "service_ms", "share_error", "throughput_vs_fifo",
                 "b_admission_p95_ms", "b_latency_p95_ms", "b_wait_p95_ms_burst_queued_first", "b_waits_passed",
                 "gave_way"}


def _job(team: str, queued: float, started: float, ended: float) -> Job:
    return Job(team=team, queued=queued, started=started, ended=ended)


def _back_to_back(order: str, queued: dict[str, float], step: float = 1.0) -> list[Job]:
    """Jobs served one after another, ``step`` seconds each, in ``order`` (one letter per job's team)."""
    return [_job(team, queued[team], i * step, (i + 1) * step) for i, team in enumerate(order)]


def test_slots_run_from_one_end_to_the_next_and_an_idle_worker_is_not_busy() -> None:
    jobs = [_job("a", 0.0, 0.0, 1.0), _job("a", 0.5, 1.0, 2.0), _job("b", 5.0, 5.0, 6.0)]
    slots = schedule(reversed(jobs))  # any order in, the worker's order out
    assert [(s.team, s.start, s.end, s.busy) for s in slots] == [
        ("a", 0.0, 1.0, False), ("a", 1.0, 2.0, True), ("b", 5.0, 6.0, False)]
    assert service_ms(slots) == 1000.0  # only the busy slot counts


def test_fair_alternation_gives_equal_shares_and_fifo_gives_the_late_team_nothing() -> None:
    queued = {"a": 0.0, "b": 0.5}
    fair = _back_to_back("aababab" + "aaa", queued)  # b's four jobs alternate with a's once b is queued
    shares, seconds, count = backlogged_shares(fair, ["a", "b"])
    # the busy slots ending at 2..7 (b queued by their start, one of its jobs not yet ended): a, b, a, b, a, b;
    # b's last job ends at 7.0, from then on only a is backlogged
    assert count == 6 and seconds == 6.0
    assert shares == {"a": 0.5, "b": 0.5}
    assert share_error(shares, {"a": 1, "b": 1}) == 0.0

    fifo = _back_to_back("aaaaaabbbb", queued)
    shares, _, count = backlogged_shares(fifo, ["a", "b"])
    assert shares == {"a": 1.0, "b": 0.0} and count == 5  # a's jobs 2..6 while b waited
    assert share_error(shares, {"a": 1, "b": 1}) == 0.5
    assert share_error(shares, {"a": 3, "b": 1}) == 0.25


def test_three_teams_count_only_while_all_three_wait() -> None:
    jobs = _back_to_back("abcaab", {"a": 0.0, "b": 0.0, "c": 0.0})
    shares, seconds, count = backlogged_shares(jobs, ["a", "b", "c"])
    assert count == 2 and seconds == 2.0  # slots 2 and 3: after them c has nothing left
    assert shares == {"a": 0.0, "b": 0.5, "c": 0.5}
    assert overall_shares(jobs, ["a", "b", "c"]) == pytest.approx({"a": 0.5, "b": 2 / 6, "c": 1 / 6})


def test_no_backlog_gives_no_shares_and_no_error() -> None:
    shares, seconds, count = backlogged_shares(_back_to_back("aaa", {"a": 0.0}), ["a", "b"])
    assert (shares, seconds, count) == ({"a": 0.0, "b": 0.0}, 0.0, 0)
    assert share_error(shares, {"a": 1, "b": 1}) is None


def test_throughput_counts_jobs_ended_by_the_bursting_teams_last_end() -> None:
    jobs = _back_to_back("abab", {"a": 0.0, "b": 0.0}) + [_job("b", 9.0, 9.0, 10.0)]
    assert throughput(jobs, ["a"]) == pytest.approx(3 / 3.0)  # a's last job ends at 3.0: three jobs ended by then
    assert throughput([], ["a"]) is None


def test_a_trickled_request_is_split_into_its_time_in_the_gateway_and_in_the_queue() -> None:
    jobs = [_job("a", 0.0, 0.0, 1.0), Job("b", 0.5, 1.0, 2.0, request_id="b1"), _job("a", 0.6, 2.0, 3.0),
            Job("b", 3.5, 3.5, 4.0, request_id="b2")]
    answers = [Answer("200", "b1", 0.25, 2.5), Answer("200", "b2", 3.5, 4.25), Answer("503", None, 1.0, 1.5)]
    assert latencies_ms(answers) == pytest.approx([2250.0, 750.0])  # the 503 is not a latency
    assert admissions_ms(answers, jobs) == pytest.approx([250.0, 0.0])


def test_a_job_is_read_from_a_terminal_entry_and_one_without_timings_is_skipped() -> None:
    at = datetime(2026, 11, 30, 9, 0, 1, tzinfo=timezone.utc)
    entry = SimpleNamespace(team="eq-b", request_id="r1", created_at=at,
                            body={"timings": {"queue_ms": 250.0, "generate_ms": 500.0}})
    job = job_from_entry(entry)
    assert job is not None and job.team == "eq-b" and job.request_id == "r1"
    assert job.ended == at.timestamp() and job.started == at.timestamp() - 0.5
    assert job.wait_ms == pytest.approx(250.0)
    assert job_from_entry(SimpleNamespace(team="x", created_at=at, body={"timings": {"queue_ms": 1.0}})) is None


def test_a_handed_over_job_ends_when_its_worker_was_free_and_a_waiting_one_when_it_recorded() -> None:
    at = datetime(2026, 11, 30, 9, 0, 1, tzinfo=timezone.utc)
    handed = job_from_entry(SimpleNamespace(team="t", request_id="h", created_at=at, body={"timings": {
        "queue_ms": 100.0, "generate_ms": 400.0, "handed_over_ms": 200.0}}))
    assert handed.ended == pytest.approx(at.timestamp() - 0.2)  # the gateway recorded it 200 ms later
    assert handed.started == pytest.approx(at.timestamp() - 0.6) and handed.wait_ms == pytest.approx(100.0)
    waited = job_from_entry(SimpleNamespace(team="t", request_id="w", created_at=at, body={"timings": {
        "queue_ms": 100.0, "generate_ms": 400.0, "verdict_ms": 200.0}}))
    assert waited.ended == at.timestamp()  # busy until it recorded
    assert waited.started == pytest.approx(at.timestamp() - 0.6)


def test_a_hand_over_is_the_gap_before_a_busy_slot_and_the_timeline_names_each_jobs_place() -> None:
    jobs = [_job("a", 10.0, 10.0, 10.004), _job("b", 10.001, 10.0065, 10.009),  # waited 5.5 ms, 2.5 of hand-over
            _job("a", 10.020, 10.020, 10.022)]  # queued after b ended: the worker sat idle, no hand-over
    assert handovers_ms(reversed(jobs)) == [pytest.approx(2.5)]
    rows = timeline(reversed(jobs))
    assert [r["team"] for r in rows] == ["a", "b", "a"]
    assert rows[1] == {"team": "b", "request_id": "", "queued_ms": 1.0, "started_ms": 6.5, "ended_ms": 9.0,
                       "wait_ms": 5.5, "handover_ms": 2.5}
    assert rows[0]["handover_ms"] is None and rows[2]["handover_ms"] is None and rows[2]["queued_ms"] == 20.0
    assert timeline([]) == [] and handovers_ms([]) == []


def test_a_wait_is_passed_when_another_teams_job_starts_after_it_was_queued_and_before_it() -> None:
    jobs = [_job("a", 0.0, 0.0, 1.0),
            _job("b", 0.95, 1.2, 2.0),  # queued as a's first ended: a's next, taken already, starts first
            _job("a", 0.1, 1.1, 1.15),
            _job("b", 3.0, 3.0, 4.0),  # nothing ahead of it
            _job("b", 3.5, 4.0, 5.0)]  # behind its own team's job only
    assert passed_waits_ms(jobs, "b") == [pytest.approx(250.0)]
    assert passed_waits_ms(jobs, "a") == [] and passed_waits_ms([], "b") == []


def _fake_run(scenario: str, phase: str, mode: str, order: str, step: float) -> PhaseRun:
    teams = SCENARIOS[scenario]
    names = [t.name for t in teams]
    letters = dict(zip("abc", names))
    jobs = [Job(letters[c], 0.0, i * step, (i + 1) * step, request_id=f"r{i}") for i, c in enumerate(order)]
    answers = {n: [Answer("200", j.request_id, -0.001, j.ended + 0.001) for j in jobs if j.team == n] for n in names}
    return PhaseRun(scenario=scenario, phase=phase, mode=mode, teams=teams, jobs=jobs, completions=len(jobs),
                    answers=answers, cpu_s={"worker_main": 0.01})


def test_the_report_has_the_issue_shape_and_the_throughput_ratio_is_per_repeat() -> None:
    runs = [_fake_run("equal", "latency", "fifo", "aaab", 0.02), _fake_run("equal", "latency", "fair", "abaa", 0.025),
            _fake_run("equal", "latency_queued", "fifo", "aaab", 0.02),
            _fake_run("equal", "latency_queued", "fair", "aaba", 0.02),
            _fake_run("equal", "shares", "fifo", "aabb", 0.02), _fake_run("equal", "shares", "fair", "abab", 0.02)]
    document = report(runs, {"burst": 3}, {"before": [0.1], "after": [0.2]})
    assert HEADLINE_KEYS <= document["fifo"].keys() and HEADLINE_KEYS <= document["fair"].keys()
    assert document["fair"]["throughput_vs_fifo"] == 0.8  # 4 jobs in 0.1 s against 3 in 0.06 s
    assert document["fair"]["share_error"] == 0.0 and document["fifo"]["share_error"] == 0.5
    assert document["requests"] == {"sent": 24, "ok": 24, "completed_in_audit": 24, "not_ok": 0,
                                    "jobs_with_timings": 24}
    assert document["fair"]["b_wait_p95_ms_burst_queued_first"] == 40.0  # b's one job started third
    assert document["goals"] == {"b_wait_p95_within_2_services": True,  # 25 ms against one job of 25 ms
                                 "b_wait_p95_within_2_services_burst_queued_first": True,
                                 "share_error_within_5_percent": True, "throughput_within_5_percent_of_fifo": False}
    assert document["fair"]["b_latency_p95_ms"] == pytest.approx(52.0)  # b's one job: sent at -1 ms, ended at 50
    assert document["fair"]["b_admission_p95_ms"] == pytest.approx(1.0)
    assert "eq-b queue wait p95 ms" in table(document)
    # back to back with no gap: every busy slot's hand-over is 0
    assert document["scenarios"]["equal"]["shares"]["fair"]["handover_ms"] == {"p50": 0.0, "p90": 0.0}
    assert "hand-over between jobs p50 / p90 ms" in table(document)
    numbered = schedules(runs + [_fake_run("equal", "latency", "fair", "ab", 0.02)])
    assert [(s["phase"], s["mode"], s["repeat"]) for s in numbered][-1] == ("latency", "fair", 2)
    assert [row["team"] for row in numbered[1]["jobs"]] == ["eq-a", "eq-b", "eq-a", "eq-a"]
    json.dumps(document)


def test_quick_shrinks_a_run_and_bad_arguments_are_refused() -> None:
    args = parse_args(["--quick"])
    assert args.burst <= 60 and args.repeat == 1 and args.scenarios == list(SCENARIOS)
    for bad in (["--burst", "0"], ["--every-ms", "0"], ["--scenarios", "nope"], ["--modes", "lifo"],
                ["--trickle-s", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def _sums_to_one_or_none(shares: dict[str, float]) -> None:
    """Shares are printed to three places, so their sum is 1 within a rounding per team (0 with no backlog)."""
    assert all(s >= 0 for s in shares.values())
    total = sum(shares.values())
    assert total == pytest.approx(1.0, abs=0.0005 * len(shares)) or total == 0.0


@pytest.mark.timeout(300)
def test_a_short_real_run_completes_every_request_and_writes_the_issue_shape(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    modes = list(MODES) if fair_mode_available() else ["fifo"]
    out = tmp_path / "fairness.json"
    args = argparse.Namespace(burst=20, every_ms=100.0, trickle_s=1.0, stagger_ms=0.0, max_tokens=4, repeat=1,
                              warmup=1, scenarios=["equal", "three_teams"], modes=modes, quick=False, json=out,
                              schedule_json=tmp_path / "schedule.json")
    document = run(args)
    assert document is not None, capsys.readouterr().err
    assert json.loads(out.read_text()) == json.loads(json.dumps(document))
    runs = json.loads((tmp_path / "schedule.json").read_text())
    assert len(runs) == len(modes) * 2 * 3  # two scenarios, three phases, one repeat
    for one in runs:  # each job once, in the worker's order, none ending before it started
        assert len({row["request_id"] for row in one["jobs"]}) == len(one["jobs"]) > 0
        ends = [row["ended_ms"] for row in one["jobs"]]
        assert ends == sorted(ends) and all(r["ended_ms"] >= r["started_ms"] >= r["queued_ms"] - 1
                                            for r in one["jobs"])

    # equal: twice 20 + 10 trickled, then 20 + 20; three teams: twice 20 + 2 x 10, then 3 x 20; in each mode
    expected = len(modes) * (2 * (20 + 10) + 40 + 2 * (20 + 20) + 60)
    assert document["requests"] == {"sent": expected, "ok": expected, "completed_in_audit": expected,
                                    "not_ok": 0, "jobs_with_timings": expected}
    for mode in modes:
        assert {"b_wait_p50_ms", "b_wait_p95_ms", "service_ms", "share_error"} <= document[mode].keys()
        assert document[mode]["b_wait_p95_ms"] >= document[mode]["b_wait_p50_ms"] >= 0
        assert document[mode]["service_ms"] > 0
        for name, phase in [(n, p) for n in ("equal", "three_teams") for p in ("latency", "latency_queued")]:
            latency = document["scenarios"][name][phase][mode]
            shares = document["scenarios"][name]["shares"][mode]
            _sums_to_one_or_none(latency["shares_overall"])
            assert sum(latency["shares_overall"].values()) > 0
            _sums_to_one_or_none(shares["shares_backlogged"])
            trickling = {t.name for t in SCENARIOS[name][1:]}
            assert set(latency["waits_ms"]) == set(latency["latency_ms"]) == set(latency["admission_ms"]) == trickling
            for team in trickling:  # every trickled request was answered, and matched to its job
                assert latency["latency_ms"][team]["count"] == latency["admission_ms"][team]["count"] == 10
            assert latency["throughput_per_s"] > 0 and shares["throughput_per_s"] > 0
            # a job gives way only to a fair job (fifo jobs are on the plain lists, which it never looks at)
            assert isinstance(latency["gave_way"], int) and latency["gave_way"] >= 0
            if mode == "fifo":
                assert latency["gave_way"] == shares["gave_way"] == 0
    if "fair" in modes:
        assert document["fair"]["throughput_vs_fifo"] > 0
        assert set(document["goals"]) == {"b_wait_p95_within_2_services", "share_error_within_5_percent",
                                          "b_wait_p95_within_2_services_burst_queued_first",
                                          "throughput_within_5_percent_of_fifo"}
