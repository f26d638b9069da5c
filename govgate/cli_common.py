"""What several ``govgate`` commands need, failing as one line that names the setting."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from gateway.settings import Settings, SettingsError, without_password

if TYPE_CHECKING:
    from sqlalchemy import Engine


def load_settings() -> Settings:
    """The settings from ``GOVGATE_*``, or a one-line error instead of a traceback."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def audit_engine() -> Engine:
    """The audit database, its schema brought up to date; a one-line error if it cannot be opened.

    A SQLite file that is not there (or is empty) is an error, not a new empty store: the audit
    commands read a store the gateway made, and a mistyped GOVGATE_VAR_DIR must not verify as
    "0 entries, chain intact" (nor leave an empty database behind).
    """
    from sqlalchemy.engine import make_url

    from audit import AuditError, make_engine, migrate
    from audit.db import sqlite_file

    settings = load_settings()
    url = settings.effective_database_url
    try:
        path = sqlite_file(make_url(url)) if url.startswith("sqlite") else None
    except Exception:  # noqa: BLE001 - make_engine below reports a bad URL
        path = None
    if path is not None and (not path.is_file() or path.stat().st_size == 0):
        raise click.ClickException(f"no audit database at {path} (GOVGATE_VAR_DIR / GOVGATE_DATABASE_URL): "
                                   "nothing to read, and none is made here")
    try:
        engine = make_engine(url, busy_timeout_s=settings.database_busy_timeout_s)
        migrate(engine)
    except AuditError as exc:
        why = " ".join(str(exc).split())  # one line: libpq's refusals run on ("\n\tIs the server running ...")
        raise click.ClickException(f"GOVGATE_DATABASE_URL={without_password(url)} cannot be used: {why}") from None
    return engine

