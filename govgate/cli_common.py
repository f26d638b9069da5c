"""What several ``govgate`` commands need, failing as one line that names the setting."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from gateway.settings import Settings, SettingsError

if TYPE_CHECKING:
    from sqlalchemy import Engine


def load_settings() -> Settings:
    """The settings from ``GOVGATE_*``, or a one-line error instead of a traceback."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def audit_engine() -> Engine:
    """The audit database, its schema brought up to date."""
    from audit import make_engine, migrate

    settings = load_settings()
    engine = make_engine(settings.effective_database_url, busy_timeout_s=settings.database_busy_timeout_s)
    migrate(engine)
    return engine
