"""``govgate audit export``: entries of a time range as JSONL or CSV, streamed, with a progress bar.

The rows are read in keyset batches and written as they come
(``audit/search.py``, ``audit/export.py``), so an export of any size holds
one batch in memory. Texts of prompts and outputs are left out unless
``--include-text`` is given, which first records a ``payload_read`` entry
naming the operator (the review API does the same for its readers); so does
``--q``, a search of the texts. The filters are read by ``audit/filters.py``,
as the review API's are, so both mean and refuse the same.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
from dataclasses import replace
from datetime import datetime, timezone
from typing import IO, Any, Iterator

import click

from govgate.cli_audit import audit
from govgate.cli_common import audit_engine
from govgate.cli_output import output_file

#: Entries between two progress-bar updates.
_PROGRESS_EVERY = 500


class FilterUsageError(click.ClickException):
    """A filter value refused by ``audit/filters.py``: one line on standard error, exit status 2 (a usage error)."""

    exit_code = 2


#: The option that gives each filter (``audit.filters.FILTERS``), for error messages.
OPTIONS = {"principal": "--principal", "team": "--team", "model": "--model", "request_id": "--request-id",
           "kind": "--kind", "decision": "--decision", "reason": "--reason", "read_of": "--read-of",
           "since": "--since", "until": "--until", "q": "--q"}


@audit.command("export")
@click.option("--since", required=True, help="First moment included: an ISO-8601 date or date-time (UTC unless "
              "it names an offset).")
@click.option("--until", help="First moment no longer included (default: now).")
@click.option("--team", help="Only this team's entries.")
@click.option("--principal", help="Only this principal's entries.")
@click.option("--model", help="Only entries about this model.")
@click.option("--request-id", help="Only the entries of this request id.")
@click.option("--kind", "kinds", multiple=True, help="Only entries of this kind (repeatable, or comma-separated).")
@click.option("--decision", help="Only request entries with this decision: allow, deny (by the policy) or "
              "unavailable (no decision could be had).")
@click.option("--reason", help="Only request entries whose decision lists this reason code.")
@click.option("--read-of", help="Only the payload_read entries that read this request id's texts.")
@click.option("--q", "text", help="Only entries whose prompt or output contains this text (ASCII "
              "case-insensitive); recorded on the chain as a payload_read entry first.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), required=True, help="Output format.")
@click.option("--out", "out", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file (made readable by its owner only) instead of standard output.")
@click.option("--include-text", is_flag=True,
              help="Include prompt and output texts (recorded on the chain as a payload_read entry first).")
def audit_export(since: str, until: str | None, team: str | None, principal: str | None, model: str | None,
                 request_id: str | None, kinds: tuple[str, ...], decision: str | None, reason: str | None,
                 read_of: str | None, text: str | None, fmt: str, out: str | None, include_text: bool) -> None:
    """Export audit entries from --since to --until, oldest first.

    The filters mean what the review API's do (GET /v1/audit/export), and are
    read by the same code (audit/filters.py).
    """
    from audit import AuditError, AuditStore
    from audit.export import chunks
    from audit.filters import FilterError, entry_filter
    from audit.kinds import PAYLOAD_READ
    from audit.search import count_matching, iter_matching

    try:
        where = entry_filter(principal=principal, team=team, model=model, request_id=request_id, kind=kinds,
                             decision=decision, reason=reason, read_of=read_of, since=since, until=until, q=text)
    except FilterError as exc:
        raise FilterUsageError(f"{OPTIONS[exc.param]}: {exc.message}") from None
    if where.until is None:
        where = replace(where, until=datetime.now(timezone.utc))
    engine = audit_engine()
    store = AuditStore(engine)
    try:
        total = count_matching(engine, where)
        with _sink(out) as sink, click.progressbar(length=total, label=f"exporting {total} entries",
                                                     file=sys.stderr) as bar:
            if include_text or where.text is not None:  # a text search reads texts, as over HTTP
                _record_read(store, PAYLOAD_READ, where)  # once the output is open, before any text is in it
            entries = _counted(iter_matching(store, where), bar.update)
            for chunk in chunks(fmt, entries, with_text=include_text):
                sink.write(chunk)
    except AuditError as exc:
        raise click.ClickException(f"export failed: {exc}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out or 'to standard output'}: {exc.strerror or exc}") from None
    finally:
        engine.dispose()


def _record_read(store: Any, kind: str, where: Any) -> None:
    """The operator's read of texts, on the chain before any text is written out (or searched)."""
    from audit.filters import filter_document

    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name (a container's bare uid): the uid names the operator
        user = f"uid-{os.getuid()}"
    store.append(kind, f"cli-export-{os.getpid()}-{int(datetime.now(timezone.utc).timestamp() * 1e6)}",
                 principal=f"cli:{user}", team=None, model=None, policy_revision=None,
                 body={"via": "cli-export", "request_ids": [], "text_search": where.text is not None,
                       "filter": filter_document(where)})


def _counted(entries: Iterator[Any], advance: Any) -> Iterator[Any]:
    pending = 0
    for entry in entries:
        yield entry
        pending += 1
        if pending == _PROGRESS_EVERY:
            advance(pending)
            pending = 0
    advance(pending)


@contextlib.contextmanager
def _sink(out: str | None) -> Iterator[IO[bytes]]:
    """The file named by --out (0600, in place only once the export is whole: ``govgate/cli_output.py``), or
    standard output."""
    if out is not None:
        with output_file(out, private=True) as handle:
            yield handle
        return
    yield sys.stdout.buffer
    sys.stdout.buffer.flush()
