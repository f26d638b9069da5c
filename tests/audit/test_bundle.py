"""Audit bundles: one team's entries, verifiable without the database, and every way to doctor one.

Written from both backends (the ``store`` fixture of tests/audit/conftest.py).
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from audit import AuditStore, make_engine
from audit.bundle import BundleVerdict, Selection, verify_bundle, write_bundle
from audit.chain import document_hash
from audit.checkpoints import CheckpointStore
from audit.signing import SigningKey, load_or_create_signing_key
from govgate.cli import main

TEAMS = ["blue", "red", "blue", None, "red", "blue"]


def _fill(store: AuditStore, teams: list[str | None] = TEAMS, tag: str = "r") -> None:
    for i, team in enumerate(teams):
        store.append("request", f"{tag}-{i}", principal=f"user-{i}", team=team, model="tiny",
                     body={"decision": {"allow": True}}, policy_revision="rev",
                     payload={"messages": [{"role": "user", "content": f"secret prompt {i}"}]})


def _bundle(store: AuditStore, key: SigningKey, selection: Selection) -> list[dict]:
    out = io.StringIO()
    write_bundle(store, key, out, selection)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _verify(lines: list[dict], key: SigningKey) -> BundleVerdict:
    return verify_bundle([json.dumps(line) for line in lines], key.public)


def _entries(lines: list[dict]) -> list[dict]:
    return [line for line in lines if "entry" in line]


def test_a_teams_bundle_verifies_and_shows_no_other_payload(store: AuditStore) -> None:
    key = SigningKey.generate()
    _fill(store)
    lines = _bundle(store, key, Selection(team="blue"))
    verdict = _verify(lines, key)
    assert verdict.ok, verdict.problems
    head = store.head().seq
    assert (verdict.first_seq, verdict.last_seq, verdict.entries) == (1, head, head)
    entries = _entries(lines)
    selected = [line["entry"] for line in entries if line["selected"]]
    assert [e["team"] for e in selected] == ["blue", "blue", "blue"]
    assert all(e["payload"]["messages"] for e in selected)
    others = [line["entry"] for line in entries if not line["selected"]]
    assert others and all(e["payload"] is None and e["payload_digest"] for e in others if e["kind"] == "request")
    assert "secret prompt 1" not in json.dumps(others)
    assert "checkpoint" in lines[-1] and lines[-1]["checkpoint"]["seq"] == head


def test_a_bundle_since_a_moment_starts_with_a_witness(store: AuditStore) -> None:
    key = SigningKey.generate()
    _fill(store)
    start = store.entries_for("r-3")[0]  # team None: the selection starts at an unselected entry
    _fill(store, ["blue", "red"], tag="late")
    lines = _bundle(store, key, Selection(team="blue", since=start.created_at))
    verdict = _verify(lines, key)
    assert verdict.ok, verdict.problems
    entries = _entries(lines)
    assert entries[0]["entry"]["request_id"] == "r-2" and not entries[0]["selected"]  # the witness is earlier
    assert [e["entry"]["request_id"] for e in entries if e["selected"]] == ["r-5", "late-0"]
    # Dropping the witness (so entries before the start could have been left out) is caught.
    doctored = [dict(lines[0], first_seq=start.seq)] + [line for line in lines[1:] if _rid(line) != "r-2"]
    assert "not earlier than the selection's start" in "\n".join(_verify(doctored, key).problems)


def test_stored_checkpoints_inside_the_range_come_after_their_entry(store: AuditStore) -> None:
    key = SigningKey.generate()
    _fill(store, ["blue", "red"])
    CheckpointStore(store.engine).make(key)
    _fill(store, ["blue"], tag="more")
    lines = _bundle(store, key, Selection(team="blue"))
    kinds = ["checkpoint" if "checkpoint" in line else "entry" for line in lines[1:]]
    assert kinds.count("checkpoint") == 2 and _verify(lines, key).ok


DOCTORINGS: dict[str, tuple[Callable[[list[dict]], list[dict]], str]] = {
    # r-0 and r-2 are blue (selected), r-1 red (not selected); see TEAMS.
    "a selected entry edited": (lambda ls: _edit(ls, "r-0", lambda e: e["entry"]["body"].update(decision={})),
                                "do not hash"),
    "a selected payload edited": (lambda ls: _edit(ls, "r-0", lambda e: e["entry"]["payload"].update(salt="0" * 32)),
                                  "does not match its digest"),
    "an unselected entry dropped": (lambda ls: [line for line in ls if _rid(line) != "r-1"], "expected entry"),
    "a team entry hidden as unselected": (lambda ls: _edit(ls, "r-2", lambda e: e.update(selected=False)),
                                          "left out although inside"),
    "another team's entry passed off as selected": (lambda ls: _edit(ls, "r-1", lambda e: e.update(selected=True)),
                                                    "selected but outside"),
    "an unselected entry's payload leaked": (lambda ls: _edit(ls, "r-1", lambda e: e["entry"].update(payload={"x": 1})),
                                             "carries its payload"),
    "rewritten with fresh hashes to the end": (lambda ls: _rehash(_edit(ls, "r-0", lambda e: e["entry"]["body"].update(
        decision={})), "r-0"), "does not sign the entry before it"),
    "the anchoring checkpoint removed": (lambda ls: ls[:-1], "not anchored"),
    "the anchoring checkpoint edited": (lambda ls: ls[:-1] + [_with(ls[-1], closing=True)], "does not verify"),
    "the tail cut and the header changed": (lambda ls: _cut_after(ls, "r-2"), "not anchored"),
    "two entries swapped": (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "expected entry"),
    "the header's since made naive": (lambda ls: [dict(ls[0], selection={"team": "blue", "since": "2024-01-01T00:00:00"}),
                                                  *ls[1:]], "header is malformed"),
    "the header's selection widened": (lambda ls: [dict(ls[0], selection={"team": None, "since": None}), *ls[1:]],
                                       "left out although inside"),
}


def _rid(line: dict) -> str | None:
    return line.get("entry", {}).get("request_id")


def _edit(lines: list[dict], request_id: str, change: Callable[[dict], None]) -> list[dict]:
    lines = json.loads(json.dumps(lines))
    for line in lines:
        if _rid(line) == request_id:
            change(line)
    return lines


def _rehash(lines: list[dict], request_id: str) -> list[dict]:
    """Recompute every hash from ``request_id``'s entry on, as a forger without the key can."""
    prev = None
    started = False
    for line in lines:
        if "entry" not in line:
            continue
        entry = line["entry"]
        started = started or entry["request_id"] == request_id
        if started:
            entry["prev_hash"] = prev if prev is not None else entry["prev_hash"]
            entry["hash"] = document_hash(entry)
        prev = entry["hash"]
    return lines


def _cut_after(lines: list[dict], request_id: str) -> list[dict]:
    seq = next(line["entry"]["seq"] for line in lines if _rid(line) == request_id)
    kept = [line for line in lines[1:] if "entry" in line and line["entry"]["seq"] <= seq]
    return [dict(lines[0], last_seq=seq), *kept]


def _with(line: dict, **changes: object) -> dict:
    return {"checkpoint": {**line["checkpoint"], **changes}}


@pytest.mark.parametrize("name", sorted(DOCTORINGS))
def test_a_doctored_bundle_is_caught(store: AuditStore, name: str) -> None:
    key = SigningKey.generate()
    _fill(store)
    lines = _bundle(store, key, Selection(team="blue"))
    assert _verify(lines, key).ok
    doctor, expected = DOCTORINGS[name]
    verdict = _verify(doctor(lines), key)
    assert not verdict.ok and expected in "\n".join(verdict.problems), verdict.problems


def test_a_bundle_signed_by_another_key_is_refused(store: AuditStore) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    _fill(store)
    verdict = _verify(_bundle(store, other, Selection(team="blue")), key)
    assert "another key" in "\n".join(verdict.problems)


def test_export_bundle_and_verify_export_on_the_command_line(store_url: str, tmp_path: Path) -> None:
    var = tmp_path / "var"
    engine = make_engine(store_url)
    _fill(AuditStore(engine))
    engine.dispose()
    load_or_create_signing_key(var / "audit-signing.key")
    env = {"GOVGATE_VAR_DIR": str(var), "GOVGATE_DATABASE_URL": store_url, "GOVGATE_AUDIT_SIGNING_KEY_FILE": ""}
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, ["audit", *args], env=env, catch_exceptions=False)

    bundle, pub = tmp_path / "blue.jsonl", tmp_path / "pub.pem"
    assert run("public-key", "--out", str(pub)).exit_code == 0
    exported = run("export-bundle", "--out", str(bundle), "--team", "blue", "--since", "1d")
    assert exported.exit_code == 0 and "3 entries selected" in exported.output
    verified = run("verify", "--export", str(bundle), "--public-key", str(pub))
    assert verified.exit_code == 0 and "bundle ok: 3 selected" in verified.output
    assert '"team": "blue"' in verified.output
    assert run("verify", "--export", str(bundle)).exit_code == 2  # a bundle cannot vouch for itself
    text = bundle.read_text().replace("secret prompt 2", "secret prompt X")
    bundle.write_text(text)
    doctored = run("verify", "--export", str(bundle), "--public-key", str(pub))
    assert doctored.exit_code == 1 and "bundle TAMPERED" in doctored.output
    assert run("export-bundle", "--out", str(bundle), "--since", "yesterday-ish").exit_code == 2


def test_the_selection_matches_team_and_time() -> None:
    moment = datetime(2024, 1, 1, tzinfo=timezone.utc)
    selection = Selection(team="blue", since=moment)
    assert selection.matches("blue", moment) and not selection.matches("red", moment)
    assert not selection.matches("blue", moment.replace(year=2023))
    assert Selection().matches(None, moment)


def test_a_bundle_of_erased_payloads_still_verifies(store: AuditStore) -> None:
    from audit.prune import prune_payloads

    key = SigningKey.generate()
    _fill(store)
    prune_payloads(store, datetime.now(timezone.utc))
    lines = _bundle(store, key, Selection(team="blue"))
    assert _verify(lines, key).ok
    selected = [line["entry"] for line in _entries(lines) if line["selected"]]
    assert selected and all(e["payload"] is None and e["payload_digest"] for e in selected)
