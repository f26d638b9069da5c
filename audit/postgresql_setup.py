"""How every PostgreSQL connection to the audit store is set up, with or without SQLAlchemy.

:func:`audit.db.make_engine` runs it on each connection its pool makes, and
:mod:`audit.driver_store` on the connection it makes itself, as
:mod:`audit.sqlite_setup` does for SQLite.

An entry must be on the server's disk before the request it records goes
on: the gateway queues a job, and a worker serves its output, only once the
append's commit returned. With ``synchronous_commit = off`` (a server,
database or role tuned for speed) a commit returns before its WAL is
written, and a server crash (an immediate shutdown, a killed postmaster, a
power cut) loses the last commits: requests served with no ``request``
entry, outputs with no terminal entry, and a chain that still verifies
because the lost entries were its tail. So a session that would commit
asynchronously commits ``local`` instead (durable on this server, not
waiting for standbys: what ``off`` meant to avoid); any other setting
(``on``, ``remote_apply`` for synchronous standbys…) is the operator's and
kept.
"""

from __future__ import annotations

from typing import Any, Final

#: Raise ``synchronous_commit`` from ``off`` to ``local`` for this session; leave any other value.
DURABLE_COMMITS_SQL: Final = ("SELECT set_config('synchronous_commit', 'local', false) "
                              "WHERE current_setting('synchronous_commit') = 'off'")


def configure_postgresql_connection(dbapi_conn: Any) -> None:
    """Make the session's commits durable on the server (see the module's docstring); commits its own statement."""
    with dbapi_conn.cursor() as cursor:
        cursor.execute(DURABLE_COMMITS_SQL)
    dbapi_conn.commit()  # a session setting made in a transaction rolled back would be undone
