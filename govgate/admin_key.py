"""The database step of ``govgate up``: schema current and an admin key, run as a child process.

Why a child: opening the database imports SQLAlchemy, Alembic and the key
store (about 50 MB and a second of CPU). The supervisor lives as long as
the stack and only watches its children, so it should not carry them; the
child exits once the key is made and its memory goes back to the system.

Run as ``python -m govgate.admin_key`` with the stack's environment: prints
one JSON line, ``{"secret": "gk_…"}`` when it made the admin key now,
``{"secret": null}`` when one already existed, or ``{"error": "…"}`` (exit 1).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from gateway.settings import Settings, SettingsError, without_password

if TYPE_CHECKING:
    from gateway.auth import KeyStore

ADMIN_ROLE = "admin"


class DatabaseUnusable(RuntimeError):
    """The database could not be migrated or read; the message names it and why."""


def ensure_admin_key(keys: KeyStore) -> str | None:
    """The admin key's secret if it was created now; None if one already exists."""
    if keys.has_role(ADMIN_ROLE):
        return None
    return keys.create("admin", team=None, roles=[ADMIN_ROLE], note="created by govgate up", by="govgate-up").secret


def prepare_database(settings: Settings) -> str | None:
    """Bring the schema up to date and make sure an admin key exists; its secret if made now."""
    from audit import AuditError
    from gateway.auth import KeyStore, KeyStoreError
    from gateway.db_setup import DatabaseError, open_database

    try:
        engine = open_database(settings)
        try:
            return ensure_admin_key(KeyStore(engine))
        finally:
            engine.dispose()
    except (AuditError, DatabaseError, KeyStoreError) as exc:
        raise DatabaseUnusable(f"the database at {without_password(settings.effective_database_url)} cannot be used: {exc}") \
            from None


def main() -> int:
    try:
        secret = prepare_database(Settings.from_env())
    except (DatabaseUnusable, SettingsError) as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    print(json.dumps({"secret": secret}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
