"""Setting up the database: the gateway's own tables (API keys), their Alembic
history, and :func:`open_database`, which brings both packages' schemas up to date.

The gateway keeps its own Alembic version table beside the audit log's, and
migrates under the audit store's cross-process lock with its own key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

from sqlalchemy import Engine, MetaData
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from audit import make_engine, migrate
from audit.db import locked_transaction, reason
from audit.migration_heads import at_head
from gateway.auth.keys import ApiKey, KeyStore

if TYPE_CHECKING:
    from alembic.config import Config

    from gateway.settings import Settings

VERSION_TABLE: Final = "alembic_version_gateway"
MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
MIGRATE_LOCK_KEY: Final = 0x60_6A_7E_A0_D1_70_00_03

#: The tables this package owns (autogenerate compares against these only).
gateway_metadata = MetaData()
ApiKey.__table__.to_metadata(gateway_metadata)


class DatabaseError(RuntimeError):
    """The gateway's schema cannot be brought up to date."""


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configuration built in code; also for writing new revisions."""
    from alembic.config import Config  # Alembic only where there is something to migrate (audit.migration_heads)

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


def migrate_gateway(engine: Engine, revision: str = "head") -> None:
    """Bring the gateway's tables up to ``revision`` (idempotent, safe concurrently).

    Tables already at head are told without importing Alembic, as for the audit schema (``audit.migrate``).
    """
    try:
        if revision == "head":
            with engine.connect() as conn:
                if at_head(conn, MIGRATIONS_DIR / "versions", VERSION_TABLE):
                    return
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot migrate the gateway schema: {reason(exc)}") from exc
    from alembic import command
    from alembic.util.exc import CommandError

    try:
        with locked_transaction(engine, MIGRATE_LOCK_KEY) as conn:
            command.upgrade(alembic_config(conn), revision)
    except (SQLAlchemyError, CommandError, OSError) as exc:
        raise DatabaseError(f"cannot migrate the gateway schema: {reason(exc)}") from exc


def open_database(settings: "Settings") -> Engine:
    """The shared engine with both packages' schemas up to date and the keys on the audit chain.

    Keys made before key changes were audited are recorded once, as one
    backfill entry, the first time a store is opened after the upgrade
    (:meth:`gateway.auth.keys.KeyStore.record_existing_keys`).
    """
    engine = make_engine(settings.effective_database_url, busy_timeout_s=settings.database_busy_timeout_s)
    migrate(engine)
    migrate_gateway(engine)
    KeyStore(engine).record_existing_keys()
    return engine
