"""``govgate audit export``: entries of a time range as JSONL or CSV, streamed, with a progress bar.

The rows are read in keyset batches and written as they come
(``audit/search.py``, ``audit/export.py``), so an export of any size holds
one batch in memory. Texts of prompts and outputs are left out unless
``--include-text`` is given, which first records a ``payload_read`` entry
naming the operator (the review API does the same for its readers).
"""

from __future__ import annotations

import getpass
import os
import sys
from datetime import date, datetime, time, timezone
from typing import IO, Any, Iterator

import click

from govgate.cli_audit import audit
from govgate.cli_common import audit_engine

#: Entries between two progress-bar updates.
_PROGRESS_EVERY = 500


class Moment(click.ParamType):
    """An ISO-8601 date (midnight UTC) or date-time (UTC when it names no offset)."""

    name = "date"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            if len(value) == 10:
                return datetime.combine(date.fromisoformat(value), time(0), tzinfo=timezone.utc)
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None or moment.utcoffset() is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.astimezone(timezone.utc)
        except (ValueError, OverflowError):
            self.fail(f"{value!r} is not an ISO-8601 date (2026-05-01) or date-time (2026-05-01T12:00:00Z) "
                      "within years 1 to 9999 in UTC", param, ctx)


@audit.command("export")
@click.option("--since", type=Moment(), required=True, help="First moment included (ISO-8601, UTC by default).")
@click.option("--until", type=Moment(), help="First moment no longer included (default: now).")
@click.option("--team", help="Only this team's entries.")
@click.option("--principal", help="Only this principal's entries.")
@click.option("--model", help="Only entries about this model.")
@click.option("--kind", "kinds", multiple=True, help="Only entries of this kind (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), required=True, help="Output format.")
@click.option("--out", "out", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file (made readable by its owner only) instead of standard output.")
@click.option("--include-text", is_flag=True,
              help="Include prompt and output texts (recorded on the chain as a payload_read entry first).")
def audit_export(since: datetime, until: datetime | None, team: str | None, principal: str | None,
                 model: str | None, kinds: tuple[str, ...], fmt: str, out: str | None, include_text: bool) -> None:
    """Export audit entries from --since to --until, oldest first."""
    from audit import AuditError, AuditStore
    from audit.export import chunks
    from audit.kinds import KINDS, PAYLOAD_READ
    from audit.search import EntryFilter, count_matching, iter_matching

    unknown = sorted(set(kinds) - KINDS)
    if unknown:
        raise click.BadParameter(f"unknown kind(s) {', '.join(unknown)}; kinds are {', '.join(sorted(KINDS))}",
                                 param_hint="--kind")
    if until is not None and until <= since:
        raise click.BadParameter("must be later than --since", param_hint="--until")
    where = EntryFilter(principal=principal, team=team, model=model, kinds=frozenset(kinds), since=since,
                        until=until or datetime.now(timezone.utc))
    engine = audit_engine()
    store = AuditStore(engine)
    try:
        total = count_matching(engine, where)
        if include_text:
            _record_read(store, PAYLOAD_READ, where)
        with _output(out) as sink, click.progressbar(length=total, label=f"exporting {total} entries",
                                                     file=sys.stderr) as bar:
            entries = _counted(iter_matching(store, where), bar.update)
            for chunk in chunks(fmt, entries, with_text=include_text):
                sink.write(chunk)
    except AuditError as exc:
        raise click.ClickException(f"export failed: {exc}") from None
    finally:
        engine.dispose()


def _record_read(store: Any, kind: str, where: Any) -> None:
    """The operator's read of texts, on the chain before any text is written out."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name (a container's bare uid): the uid names the operator
        user = f"uid-{os.getuid()}"
    store.append(kind, f"cli-export-{os.getpid()}-{int(datetime.now(timezone.utc).timestamp() * 1e6)}",
                 principal=f"cli:{user}", team=None, model=None, policy_revision=None,
                 body={"via": "cli-export", "request_ids": [], "text_search": False,
                       "filter": {"principal": where.principal, "team": where.team, "model": where.model,
                                  "kinds": sorted(where.kinds), "since": where.since.isoformat(),
                                  "until": where.until.isoformat()}})


def _counted(entries: Iterator[Any], advance: Any) -> Iterator[Any]:
    pending = 0
    for entry in entries:
        yield entry
        pending += 1
        if pending == _PROGRESS_EVERY:
            advance(pending)
            pending = 0
    advance(pending)


class _output:
    """The file named by --out (0600, replaced whole only when the export finished), or stdout."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.temp: str | None = None
        self.handle: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        if self.path is None:
            return sys.stdout.buffer
        self.temp = f"{self.path}.partial-{os.getpid()}"
        fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.handle = os.fdopen(fd, "wb")
        return self.handle

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self.handle is None or self.temp is None:
            sys.stdout.buffer.flush()
            return
        self.handle.close()
        if exc_type is None:
            os.replace(self.temp, self.path)  # type: ignore[arg-type]
        else:
            os.unlink(self.temp)
