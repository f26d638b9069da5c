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
import re
import sys
from dataclasses import replace
from datetime import datetime, timezone
from typing import IO, Any, Callable, Iterator

import click

from govgate.cli_audit import audit
from govgate.cli_common import audit_engine
from govgate.cli_output import output_file
from govgate.own_entries import sign_own_entry_while_down

#: Entries between two progress-bar updates.
_PROGRESS_EVERY = 500


class FilterUsageError(click.ClickException):
    """A filter value refused by ``audit/filters.py``: one line on standard error, exit status 2 (a usage error)."""

    exit_code = 2


#: The option that gives each filter (``audit.filters.FILTERS``), for error messages.
OPTIONS = {"principal": "--principal", "team": "--team", "model": "--model", "request_id": "--request-id",
           "kind": "--kind", "decision": "--decision", "reason": "--reason", "read_of": "--read-of",
           "since": "--since", "until": "--until", "q": "--q"}


#: The name each single-valued option has over HTTP (GET /v1/audit/export), for the "given once" message.
_API_NAMES = {"since": "since", "until": "until", "team": "team", "principal": "principal", "model": "model",
              "request_id": "request_id", "decision": "decision", "reason": "reason", "read_of": "read_of",
              "text": "q", "fmt": "format", "out": "out"}
#: A period back from now, as ``export-bundle`` and ``policy replay`` take it (``gateway.replay.parse_since``).
_PERIOD = re.compile(r"[0-9]+[mhdw]")  # ASCII digits: \d read '٣٠d' as 30 days (probe s56)


def _given_once(_ctx: click.Context, param: click.Parameter, values: tuple[Any, ...]) -> Any:
    """The option's one value: given twice it is refused as the API refuses a repeated parameter (a second
    ``--since`` used to win silently and export nothing, h11 #9)."""
    if len(values) > 1:
        name = _API_NAMES[param.name or ""]
        raise FilterUsageError(f"{param.opts[0]}: {name} may be given once.")
    if values:
        return values[0]
    return param.default[0] if isinstance(param.default, tuple) and param.default else None


def _once(*decls: str, **attrs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A single-valued option that refuses being given more than once (Click keeps the last one)."""
    default = attrs.pop("default", None)
    return click.option(*decls, multiple=True, callback=_given_once,
                        default=(default,) if default is not None else (), **attrs)


#: What the CLI adds to the API's refusal of a moment it cannot read: the periods the CLI reads too (probe s56 C).
PERIODS_TOO = ", or a period back from now (30d, 12h, 30m, 2w)"


def _moment(option: str, text: str | None) -> str | None:
    """``--since``/``--until`` as the shared filter reads them: a period (``30d``, ``12h``) made the moment that
    long ago; anything else is passed on as given, to be read as the API reads it, and refused in the API's
    words and :data:`PERIODS_TOO`."""
    if text is None:
        return None
    if not _PERIOD.fullmatch(text.strip()):
        from audit.filters import FilterError, parse_time

        try:
            parse_time(option.removeprefix("--"), text)
        except FilterError as exc:
            raise FilterUsageError(f"{option}: {exc.message.rstrip('.')}{PERIODS_TOO}") from None
        return text
    from gateway.replay import parse_since

    try:
        return parse_since(text).isoformat()
    except ValueError as exc:
        raise FilterUsageError(f"{option}: {exc}") from None


@audit.command("export")
@_once("--since", required=True, help="First moment included: an ISO-8601 date or date-time (UTC unless "
       "it names an offset), or a period back from now (30d, 12h, 30m, 2w).")
@_once("--until", help="First moment no longer included (default: now); a date, date-time or period as --since.")
@_once("--team", help="Only this team's entries.")
@_once("--principal", help="Only this principal's entries.")
@_once("--model", help="Only entries about this model.")
@_once("--request-id", help="Only the entries of this request id.")
@click.option("--kind", "kinds", multiple=True, help="Only entries of this kind (repeatable, or comma-separated).")
@_once("--decision", help="Only request entries with this decision: allow, deny (by the policy) or "
       "unavailable (no decision could be had).")
@_once("--reason", help="Only request entries whose decision lists this reason code.")
@_once("--read-of", help="Only the payload_read entries that read this request id's texts.")
@_once("--q", "text", help="Only entries whose prompt or output contains this text (ASCII "
       "case-insensitive); recorded on the chain as a payload_read entry first.")
@_once("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
       help="Output format (as the API's, JSON lines unless asked).")
@_once("--out", "out", type=click.Path(dir_okay=False, writable=True),
       help="Write to this file (made readable by its owner only) instead of standard output ('-', as "
            "for 'audit checkpoint').")
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

    if out is not None and not out.strip():  # read as the current folder: "cannot write to standard output"
        raise click.BadParameter("an empty path (leave --out out, or give -, for standard output)",
                                 param_hint="'--out'")
    since, until = _moment("--since", since), _moment("--until", until)
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
                read = _record_read(store, PAYLOAD_READ, where)  # once the output is open, before any text
                sign_own_entry_while_down(engine, read.seq, read.hash)  # no gateway runs: no chain_anomaly
            entries = _counted(iter_matching(store, where), bar.update)
            for chunk in chunks(fmt, entries, with_text=include_text):
                sink.write(chunk)
    except AuditError as exc:
        raise click.ClickException(f"export failed: {exc}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out if out not in (None, '-') else 'to standard output'}: "
                                   f"{exc.strerror or exc}") from None
    finally:
        engine.dispose()


def _record_read(store: Any, kind: str, where: Any) -> Any:
    """The operator's read of texts, on the chain before any text is written out (or searched); its entry."""
    from audit.filters import filter_document

    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name (a container's bare uid): the uid names the operator
        user = f"uid-{os.getuid()}"
    return store.append(kind, f"cli-export-{os.getpid()}-{int(datetime.now(timezone.utc).timestamp() * 1e6)}",
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
    if out is not None and out != "-":  # '-' made a file named '-' (probe s56); the other commands' stdout
        with output_file(out, private=True) as handle:
            yield handle
        return
    yield sys.stdout.buffer
    sys.stdout.buffer.flush()
