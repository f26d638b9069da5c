"""What several ``govgate`` commands need, failing as one line that names the setting."""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

import click

from gateway.settings import Settings, SettingsError, unknown_settings, without_password

if TYPE_CHECKING:
    from sqlalchemy import Engine


#: Where a regorus compile error points (``  --> x.rego:2:1``) and what it says (``error: rule must …``).
_REGO_WHERE = re.compile(r"-->\s*(\S+)")
_REGO_ERROR = re.compile(r"^error:\s*(.+?)\s*$", re.MULTILINE)


def given_once(_ctx: click.Context, param: click.Parameter, values: tuple[object, ...]) -> object:
    """A ``multiple=True`` option's one value, refused when given twice (Click keeps the last one silently:
    ``keys create --user bob --user carol`` made carol's key, probe s56)."""
    if len(values) > 1:
        raise click.BadParameter("may be given once", param=param)
    return values[0] if values else None


def one_line(message: str) -> str:
    """``message`` on one line, for an error an operator reads (and ``govgate up`` quotes by its last line).

    A Rego compile error keeps its place and reason (``x.rego:2:1: rule must have a body or assignment``)
    rather than its drawing of the source line; anything else has its line breaks and runs of blanks made
    single spaces.
    """
    where, error = _REGO_WHERE.search(message), _REGO_ERROR.search(message)
    if where and error and where.start() < error.start():
        head = " ".join(message[:where.start()].split())
        return f"{head}{' ' if head else ''}{where.group(1)}: {error.group(1)}"
    return " ".join(message.split())


def load_settings() -> Settings:
    """The settings from ``GOVGATE_*``, or a one-line error instead of a traceback; a warning (stderr) for
    each ``GOVGATE_*`` variable no setting reads (a typo was ignored in silence), once per process."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    _warn_unknown()
    return settings


@functools.cache
def _warn_unknown() -> None:
    for name, close in unknown_settings():
        hint = f" (did you mean {close}?)" if close else ""
        click.echo(f"govgate: warning: {name} is not a setting and is ignored{hint}", err=True)


def audit_engine(*, upgrade: bool = False) -> Engine:
    """The audit database; a one-line error if it cannot be opened or its schema is not this version's.

    The schema is brought up to date only with ``upgrade``: reading commands (tail, verify, export, …)
    must not upgrade a store that an older govgate may still be writing to (its next entry would not
    verify, and an append-only log cannot be mended), nor change a backup they are asked to check.

    A SQLite file that is not there (or is empty) is an error, not a new empty store: the audit
    commands read a store the gateway made, and a mistyped GOVGATE_VAR_DIR must not verify as
    "0 entries, chain intact" (nor leave an empty database behind).
    """
    from audit import AuditError, make_engine, migrate

    settings = load_settings()
    url = settings.effective_database_url
    refuse_missing_store(url)
    try:
        engine = make_engine(url, busy_timeout_s=settings.database_busy_timeout_s)
        if upgrade:
            migrate(engine)
        else:
            other = _other_schema(engine)
    except AuditError as exc:
        why = " ".join(str(exc).split())  # one line: libpq's refusals run on ("\n\tIs the server running ...")
        raise click.ClickException(f"GOVGATE_DATABASE_URL={without_password(url)} cannot be used: {why}") from None
    if not upgrade and other is not None:
        engine.dispose()
        raise click.ClickException(
            f"the audit store at {without_password(url)} has schema {other[0]}, this govgate expects {other[1]}: "
            "this command reads a store as it is and does not upgrade it (an older govgate still writing to it "
            "would break the chain). Stop every gateway and worker of the older version, then upgrade it by "
            "starting this one (govgate up / govgate serve) or with any 'govgate keys' command; to read a backup, "
            "upgrade a copy of it")
    return engine


def refuse_missing_store(url: str) -> None:
    """A one-line error when ``url`` names a SQLite file that is not there (or is empty).

    The commands that read or change what a store holds (the audit commands, ``keys list``, ``revoke``,
    ``roles``) work on a store a gateway made: opening a mistyped path would make a new empty one there
    (its folders too) and report "0 entries, chain intact" or "no keys" (probe s54 F3, for ``keys list``).
    """
    from sqlalchemy.engine import make_url

    from audit.db import sqlite_file

    try:
        path = sqlite_file(make_url(url)) if url.startswith("sqlite") else None
    except Exception:  # noqa: BLE001 - opening the engine reports a bad URL
        path = None
    if path is not None and (not path.is_file() or path.stat().st_size == 0):
        raise click.ClickException(f"no audit database at {path} (GOVGATE_VAR_DIR / GOVGATE_DATABASE_URL): "
                                   "nothing to read, and none is made here")


def _other_schema(engine: Engine) -> tuple[str, str] | None:
    """``(stored, expected)`` revisions when the audit schema is not at this version's heads, else None."""
    from audit.db import DB_ERRORS, MIGRATIONS_DIR, VERSION_TABLE, describe, reason
    from audit.errors import AuditError
    from audit.migration_heads import at_head, script_heads, stored_revisions

    versions = MIGRATIONS_DIR / "versions"
    try:
        with engine.connect() as conn:
            if at_head(conn, versions, VERSION_TABLE):
                return None
            stored = stored_revisions(conn, VERSION_TABLE)
    except DB_ERRORS as exc:
        raise AuditError(f"cannot read the audit schema's version in {describe(engine)}: {reason(exc)}") from exc
    heads = script_heads(versions) or frozenset()
    return (", ".join(sorted(stored)) if stored else "none", ", ".join(sorted(heads)) or "unknown")
