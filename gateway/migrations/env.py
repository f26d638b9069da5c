"""Alembic environment for the gateway's tables; run via gateway.db_setup.migrate_gateway."""

from __future__ import annotations

from alembic import context

from gateway.db_setup import VERSION_TABLE, gateway_metadata


def _include_name(name: str | None, type_: str, _parents: dict[str, str | None]) -> bool:
    """Autogenerate sees only the gateway's tables, never the audit log's."""
    if type_ == "table":
        return name in gateway_metadata.tables
    return True


_common = dict(target_metadata=gateway_metadata, version_table=VERSION_TABLE, include_name=_include_name,
               render_as_batch=True, compare_type=True)

if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True, **_common)
else:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run gateway migrations via gateway.db_setup.migrate_gateway(engine)")
    context.configure(connection=connection, **_common)
with context.begin_transaction():
    context.run_migrations()
