"""Alembic environment for the audit schema.

Run through :func:`audit.db.migrate`, which passes an open connection that is
already inside a locked transaction; the options (own version table, only
audit tables) come from :func:`audit.db.migration_options`, so the gateway's
tables and Alembic history in the same database are neither touched nor
reported.
"""

from __future__ import annotations

from alembic import context

from audit.db import migration_options

if context.is_offline_mode():
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True, **migration_options()
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run audit migrations via audit.db.migrate(engine)")
    context.configure(connection=connection, **migration_options())
    with context.begin_transaction():
        context.run_migrations()
