"""Audit bundles: one team's entries, verifiable without the database, and every way to doctor one.

Written from both backends (the ``store`` fixture of tests/audit/conftest.py).
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable

import pytest
from click.testing import CliRunner, Result

import audit.bundle
from audit import AuditError, AuditStore, make_engine
from audit.bundle import BundleVerdict, Selection, verify_bundle, write_bundle
from audit.chain import canonical_json, canonical_text, document_hash, payload_digest
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
    return verify_bundle([canonical_text(line) + "\n" for line in lines], key.public)


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
    # a selected entry's text left out by its exporter (the digest still hashes): verified as ok before
    "a selected payload dropped": (lambda ls: _edit(ls, "r-0", lambda e: e["entry"].update(payload=None)),
                                   "no payloads_erased entry of the bundle erased them"),
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


@pytest.mark.parametrize("planted", ["payload and digest", "digest alone"])
def test_a_payload_given_to_a_format_1_entry_is_caught(store: AuditStore, planted: str) -> None:
    """Format 1 chains neither payload nor digest: a matching pair added afterwards would pass every hash."""
    key = SigningKey.generate()
    _fill(store)
    lines = _bundle(store, key, Selection())  # everything selected, the format-1 boundary entry too
    [boundary] = [line for line in _entries(lines) if line["entry"]["seq"] == 1]
    assert boundary["selected"] and boundary["entry"]["format"] == 1 and boundary["entry"]["payload"] is None
    forged = {"messages": [{"role": "user", "content": "a prompt never asked"}]}

    def plant(line: dict) -> None:
        line["entry"]["payload_digest"] = payload_digest(canonical_json(forged))
        if planted == "payload and digest":
            line["entry"]["payload"] = forged

    doctored = _edit(lines, boundary["entry"]["request_id"], plant)
    assert document_hash(_entries(doctored)[0]["entry"]) == boundary["entry"]["hash"]  # the hash still holds
    verdict = _verify(doctored, key)
    assert not verdict.ok
    problems = "\n".join(verdict.problems)
    assert "entry 1 is format 1 but carries a payload or payload_digest" in problems, problems


def _text_lines(store: AuditStore, key: SigningKey, selection: Selection) -> list[str]:
    """The bundle as written, line by line (each with its newline)."""
    out = io.StringIO()
    write_bundle(store, key, out, selection)
    return out.getvalue().splitlines(keepends=True)


def _line_of(lines: list[str], request_id: str) -> int:
    return next(i for i, line in enumerate(lines) if f'"request_id":"{request_id}"' in line)


def _forged_key_first(lines: list[str]) -> list[str]:
    """r-0's line with a forged payload in front of the real one: Python keeps the last, other readers the first."""
    i = _line_of(lines, "r-0")
    assert lines[i].startswith('{"entry":{')
    forged = '{"entry":{"payload":{"messages":[{"content":"FORGED","role":"user"}]},' + lines[i][len('{"entry":{'):]
    return [*lines[:i], forged, *lines[i + 1:]]


def _respaced(lines: list[str], i: int) -> list[str]:
    return [*lines[:i], json.dumps(json.loads(lines[i]), sort_keys=True) + "\n", *lines[i + 1:]]


NOT_CANONICAL: dict[str, tuple[Callable[[list[str]], list[str]], str]] = {
    "a duplicate key in an entry, the forged value first": (_forged_key_first, "line {r0} is not canonical JSON"),
    "an entry line respaced": (lambda ls: _respaced(ls, _line_of(ls, "r-0")), "line {r0} is not canonical JSON"),
    "a duplicate key in the header, another team first": (
        lambda ls: ['{"selection":{"since":null,"team":"red"},' + ls[0][1:], *ls[1:]],
        "the header line is not canonical JSON"),
    "the header respaced": (lambda ls: _respaced(ls, 0), "the header line is not canonical JSON"),
}


@pytest.mark.parametrize("name", sorted(NOT_CANONICAL))
def test_a_bundle_line_that_is_not_canonical_json_is_refused(store: AuditStore, name: str) -> None:
    """Readers may not see what verify checked (which of two keys counts), so only the exported text is taken."""
    key = SigningKey.generate()
    _fill(store)
    lines = _text_lines(store, key, Selection(team="blue"))
    assert verify_bundle(lines, key.public).ok
    doctor, expected = NOT_CANONICAL[name]
    doctored = doctor(lines)
    assert [json.loads(line) for line in doctored] == [json.loads(line) for line in lines]  # Python sees no change
    verdict = verify_bundle(doctored, key.public)
    expected = expected.format(r0=_line_of(lines, "r-0") + 1)
    assert not verdict.ok and any(problem.startswith(expected) for problem in verdict.problems), verdict.problems


def _naive_created_at(lines: list[str]) -> list[str]:
    """r-0's created_at without its time zone, the entry re-hashed so that it is consistent in itself."""
    i = _line_of(lines, "r-0")
    line = json.loads(lines[i])
    line["entry"]["created_at"] = line["entry"]["created_at"].removesuffix("+00:00")
    line["entry"]["hash"] = document_hash(line["entry"])
    return [*lines[:i], canonical_text(line) + "\n", *lines[i + 1:]]


def _in_payload(text: str) -> Callable[[list[str]], list[str]]:
    def change(lines: list[str]) -> list[str]:
        i = _line_of(lines, "r-0")
        return [*lines[:i], lines[i].replace('"payload":{', '"payload":{' + text, 1), *lines[i + 1:]]
    return change


DEEP = "[" * 100_000 + "]" * 100_000 + "\n"
UNREADABLE: dict[str, tuple[Callable[[list[str]], list[str]], str]] = {
    "NaN in a payload": (_in_payload('"x":NaN,'), "line {r0} is not JSON"),
    "a lone surrogate in a payload": (_in_payload('"x":"\\ud800",'), "line {r0} is not canonical JSON"),
    "an entry line nested very deep": (lambda ls: [*ls[:2], DEEP, *ls[3:]], "line 3 is not JSON"),
    "a header nested very deep": (lambda ls: [DEEP, *ls[1:]], "the bundle has no header line"),
    "a naive created_at, re-hashed": (_naive_created_at, "line {r0}: entry {seq} lacks a hashed field or has a "
                                                         "malformed one (created_at has no time zone)"),
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_a_bundle_no_parser_agrees_on_is_a_problem_not_a_crash(store: AuditStore, name: str) -> None:
    key = SigningKey.generate()
    _fill(store)
    lines = _text_lines(store, key, Selection(team="blue"))
    r0 = _line_of(lines, "r-0")
    doctor, expected = UNREADABLE[name]
    verdict = verify_bundle(doctor(lines), key.public)
    expected = expected.format(r0=r0 + 1, seq=json.loads(lines[r0])["entry"]["seq"])
    assert not verdict.ok and any(problem.startswith(expected) for problem in verdict.problems), verdict.problems


def test_a_bundle_signed_by_another_key_is_refused(store: AuditStore) -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    _fill(store)
    verdict = _verify(_bundle(store, other, Selection(team="blue")), key)
    assert "another key" in "\n".join(verdict.problems)


def test_export_bundle_and_verify_export_on_the_command_line(store_url: str, tmp_path: Path) -> None:
    run = _command_line(store_url, tmp_path)
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


def test_a_checkpoint_kept_elsewhere_is_held_against_the_bundle(store: AuditStore) -> None:
    """``verify --export --checkpoint``: the bundle must hold the entry it signs, with the hash it signs."""
    from audit.checkpoints import sign_checkpoint

    key = SigningKey.generate()
    _fill(store)
    lines = _bundle(store, key, Selection(team="blue"))
    entries = _entries(lines)
    third = entries[2]["entry"]
    kept = sign_checkpoint(key, third["seq"], third["hash"])
    verdict = verify_bundle([canonical_text(line) + "\n" for line in lines], key.public, kept)
    assert verdict.ok and verdict.external_checked is True

    # The exporter (who has the key) rewrote entry 3 and signed again: linked and signed, but not what was kept.
    rewritten = _rehash(_edit(lines, third["request_id"], lambda line: line["entry"]["body"].update(rewritten=True)),
                        third["request_id"])
    for i, line in enumerate(rewritten):
        if "checkpoint" in line:
            before = rewritten[i - 1]["entry"]
            rewritten[i] = {"checkpoint": sign_checkpoint(key, before["seq"], before["hash"]).to_document(key.public)}
    assert _verify(rewritten, key).ok  # without the kept checkpoint nothing shows it
    verdict = verify_bundle([canonical_text(line) + "\n" for line in rewritten], key.public, kept)
    assert not verdict.ok and f"the bundle's entry {third['seq']} holds" in verdict.problems[0]

    forged = sign_checkpoint(SigningKey.generate(), third["seq"], third["hash"])
    verdict = verify_bundle([canonical_text(line) + "\n" for line in lines], key.public, forged)
    assert not verdict.ok and "checkpoint file" in verdict.problems[0] and "another key" in verdict.problems[0]

    beyond = sign_checkpoint(key, entries[-1]["entry"]["seq"] + 5, "0" * 64)
    verdict = verify_bundle([canonical_text(line) + "\n" for line in lines], key.public, beyond)
    assert verdict.ok and verdict.external_checked is False  # not checked: not a sign of tampering either


def test_verify_export_uses_checkpoint_and_refuses_what_it_cannot_use(store_url: str, tmp_path: Path) -> None:
    """Until 2026-12-05 ``--checkpoint`` (even one that did not exist), ``--jobs`` and ``--max-unsigned-age``
    were ignored with ``--export`` and the bundle said ok (probe s54 F1)."""
    run = _command_line(store_url, tmp_path)
    bundle, pub, kept = tmp_path / "blue.jsonl", tmp_path / "pub.pem", tmp_path / "cp.json"
    assert run("public-key", "--out", str(pub)).exit_code == 0
    assert run("export-bundle", "--out", str(bundle), "--team", "blue").exit_code == 0
    assert run("checkpoint", "--out", str(kept)).exit_code == 0  # the head the export signed
    verified = run("verify", "--export", str(bundle), "--public-key", str(pub), "--checkpoint", str(kept), "--strict")
    assert verified.exit_code == 0 and "bundle ok" in verified.output
    head = json.loads(kept.read_text())["seq"]
    assert f"checkpoint file ok: the bundle's entry {head} is the one it signs" in verified.output

    missing = run("verify", "--export", str(bundle), "--public-key", str(pub), "--checkpoint", str(tmp_path / "no"))
    assert missing.exit_code == 2 and "--checkpoint: cannot read checkpoint file" in missing.output
    for extra in (["--jobs", "1"], ["--max-unsigned-age", "5"]):
        refused = run("verify", "--export", str(bundle), "--public-key", str(pub), *extra)
        assert refused.exit_code == 2 and f"{extra[0]} cannot be used with --export" in refused.output
    absent = run("verify", "--export", str(tmp_path / "none.jsonl"), "--public-key", str(pub))
    assert absent.exit_code == 2 and "--export: cannot read" in absent.output

    engine = make_engine(store_url)
    _fill(AuditStore(engine), ["blue"], tag="later")  # the chain grows past the bundle
    engine.dispose()
    assert run("checkpoint", "--out", str(kept)).exit_code == 0
    later = run("verify", "--export", str(bundle), "--public-key", str(pub), "--checkpoint", str(kept))
    assert later.exit_code == 2 and "bundle ok" in later.output
    beyond = json.loads(kept.read_text())["seq"]
    assert beyond > head and f"--checkpoint: it signs entry {beyond}, outside the bundle's entries 1..{head}" \
        in later.output


def _command_line(store_url: str, tmp_path: Path) -> Callable[..., Result]:
    """``govgate audit …`` on the store (three blue entries in it), with a signing key of its own."""
    var = tmp_path / "var"
    engine = make_engine(store_url)
    _fill(AuditStore(engine))
    engine.dispose()
    load_or_create_signing_key(var / "audit-signing.key")
    env = {"GOVGATE_VAR_DIR": str(var), "GOVGATE_DATABASE_URL": store_url, "GOVGATE_AUDIT_SIGNING_KEY_FILE": ""}
    return lambda *args: CliRunner().invoke(main, ["audit", *args], env=env, catch_exceptions=False)


def test_export_bundle_writes_a_private_file(store_url: str, tmp_path: Path) -> None:
    """The bundle holds prompts and outputs: 0600 whatever the umask, as the database and keys are."""
    run = _command_line(store_url, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    bundle = out / "blue.jsonl"
    bundle.write_text("an older bundle")
    previous = os.umask(0o022)
    try:
        assert run("export-bundle", "--out", str(bundle), "--team", "blue").exit_code == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600 and list(out.iterdir()) == [bundle]
    assert json.loads(bundle.read_text().splitlines()[0])["selection"]["team"] == "blue"


def test_export_bundle_to_a_device_writes_it_directly(store_url: str, tmp_path: Path) -> None:
    """/dev/stdout, /dev/null, a pipe: no temporary file beside them (in /dev) and nothing to rename."""
    run = _command_line(store_url, tmp_path)
    before = set(os.listdir("/dev"))
    result = run("export-bundle", "--out", "/dev/null", "--team", "blue")
    assert result.exit_code == 0, result.output
    assert set(os.listdir("/dev")) - before == set()


@pytest.mark.parametrize(("error", "message"), [
    (AuditError("the database went away"), "Error: the database went away"),
    (OSError(errno.ENOSPC, "No space left on device"), "Error: cannot write {out}: No space left on device"),
], ids=["AuditError", "OSError"])
def test_export_bundle_that_fails_leaves_no_file_behind(store_url: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, error: Exception,
                                                        message: str) -> None:
    """Half a bundle (its header and some entries written) is neither left at the target nor in a temporary."""
    run = _command_line(store_url, tmp_path)

    def failing(store: AuditStore, key: SigningKey, out: IO[str], selection: Selection) -> None:
        out.write('{"bundle":"half"}\n' * 1000)
        out.flush()
        raise error

    monkeypatch.setattr(audit.bundle, "write_bundle", failing)
    out = tmp_path / "out"
    out.mkdir()
    bundle = out / "blue.jsonl"
    result = run("export-bundle", "--out", str(bundle), "--team", "blue")
    assert result.exit_code == 1 and result.output.strip() == message.format(out=bundle), result.output
    assert list(out.iterdir()) == []


def test_verify_export_of_a_header_nested_too_deep_is_a_verdict(store_url: str, tmp_path: Path) -> None:
    run = _command_line(store_url, tmp_path)
    bundle, pub = tmp_path / "blue.jsonl", tmp_path / "pub.pem"
    assert run("public-key", "--out", str(pub)).exit_code == 0
    assert run("export-bundle", "--out", str(bundle), "--team", "blue").exit_code == 0
    bundle.write_text("[" * 100_000 + "]" * 100_000 + "\n" + "".join(bundle.read_text().splitlines(True)[1:]))
    result = run("verify", "--export", str(bundle), "--public-key", str(pub))
    assert result.exit_code == 1 and "bundle TAMPERED" in result.output
    assert "the bundle has no header line" in result.output


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


def _with_field(lines: list[str], i: int, place: Callable[[dict], dict]) -> list[str]:
    """Line ``i`` with a field put in by ``place``, written as canonical JSON (as an exporter would)."""
    return [*lines[:i], canonical_text(place(json.loads(lines[i]))) + "\n", *lines[i + 1:]]


def _last_checkpoint(lines: list[str]) -> int:
    return max(i for i, line in enumerate(lines) if line.startswith('{"checkpoint":'))


UNCOVERED: dict[str, tuple[Callable[[list[str]], list[str]], str]] = {
    "a note beside an entry": (lambda ls: _with_field(ls, _line_of(ls, "r-0"), lambda d: {
        **d, "note": "approved by CISO"}), "line {r0}: an entry line with other fields (unexpected 'note')"),
    "a field inside an entry": (lambda ls: _with_field(ls, _line_of(ls, "r-0"), lambda d: {
        **d, "entry": {**d["entry"], "extra": 1}}), "line {r0}: an entry with other fields than its format's"),
    "a field beside a checkpoint": (lambda ls: _with_field(ls, _last_checkpoint(ls), lambda d: {
        **d, "approved": True}), "line {cp}: a checkpoint line with other fields"),
    "a field inside a checkpoint": (lambda ls: _with_field(ls, _last_checkpoint(ls), lambda d: {
        "checkpoint": {**d["checkpoint"], "by": "ciso"}}), "line {cp}: a checkpoint with other fields"),
    "a field in the header": (lambda ls: _with_field(ls, 0, lambda d: {**d, "reviewed": "ok"}),
                              "the bundle header has other fields"),
    "the last checkpoint twice": (lambda ls: [*ls[:_last_checkpoint(ls) + 1], ls[_last_checkpoint(ls)],
                                              *ls[_last_checkpoint(ls) + 1:]],
                                  "line {cp2}: a second checkpoint line for the same entry"),
    "CRLF line ends": (lambda ls: [ls[0], *(line.replace("\n", "\r\n") for line in ls[1:])],
                       "line 2 ends with a carriage return"),
}


@pytest.mark.parametrize("name", sorted(UNCOVERED))
def test_content_no_hash_or_signature_covers_is_refused(store: AuditStore, name: str) -> None:
    """A bundle passed ``verify --export`` with a note beside an entry, fields inside entries, checkpoints or the
    header, a checkpoint line repeated, or CRLF line ends (probe s59 F6): content nothing signs, which a reader
    of the bundle would take for part of it. Only the lines the exporter writes are taken."""
    key = SigningKey.generate()
    _fill(store)
    lines = _text_lines(store, key, Selection(team="blue"))
    assert verify_bundle(lines, key.public).ok
    doctor, expected = UNCOVERED[name]
    verdict = verify_bundle(doctor(lines), key.public)
    cp = _last_checkpoint(lines) + 1
    expected = expected.format(r0=_line_of(lines, "r-0") + 1, cp=cp, cp2=cp + 1)
    assert not verdict.ok and any(problem.startswith(expected) for problem in verdict.problems), verdict.problems


def test_verify_export_reads_the_lines_as_written(store_url: str, tmp_path: Path) -> None:
    """Read in text mode, CRLF line ends were turned into LF before the check (probe s59 F6)."""
    run = _command_line(store_url, tmp_path)
    bundle, pub = tmp_path / "blue.jsonl", tmp_path / "pub.pem"
    assert run("public-key", "--out", str(pub)).exit_code == 0
    assert run("export-bundle", "--out", str(bundle), "--team", "blue").exit_code == 0
    bundle.write_bytes(bundle.read_bytes().replace(b"\n", b"\r\n"))
    verified = run("verify", "--export", str(bundle), "--public-key", str(pub))
    assert verified.exit_code == 1 and "bundle TAMPERED" in verified.output, verified.output
