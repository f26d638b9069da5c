"""The soak's PostgreSQL audit store and its faults (``bench/soak.py --database postgres``).

Why: production keeps the audit on PostgreSQL, where a database that goes
away is a different event from SQLite's locked file: sessions cut by a
restart, a crash recovered from the WAL, a session the server (or an
operator) terminates under a worker's kept connection. The promises are the
same (every accepted request one terminal entry, fail closed, the chain
verifies), so the soak runs them against a real server too.

The server is the suite's own helper (``tests/postgres_server.py``: ``initdb``
into a temporary folder, loopback only), as ``bench/audit.py`` uses it; a
fresh database of its own holds the run's store.
"""

from __future__ import annotations

import time
from typing import Any

#: How long the database stays down in a restart or crash fault.
DB_DOWN_S = 3.0


class SoakDatabase:
    """A PostgreSQL server and a fresh database for one soak run; its faults return (detail, restart s)."""

    def __init__(self) -> None:
        from tests.postgres_server import PostgresServer

        self.server: Any = PostgresServer.start()
        try:
            self.url = self.server.fresh_database("soak")
        except BaseException:
            self.server.stop()
            raise
        #: When the last fault took the database away (``time.monotonic()``).
        self.down_at: float | None = None

    @property
    def name(self) -> str:
        from sqlalchemy.engine import make_url

        return str(make_url(self.url).database)

    def restart(self, *, crash: bool, down_s: float = DB_DOWN_S) -> tuple[str, float]:
        """Stop the server (fast shutdown, or a crash: SIGQUIT, no checkpoint), leave it down ``down_s``,
        start it again on the same data folder and port (a crash recovers from the WAL)."""
        (self.server.crash if crash else self.server.pause)()
        self.down_at = time.monotonic()
        time.sleep(down_s)
        started = time.monotonic()
        self.server.resume()
        kind = "crashed (SIGQUIT)" if crash else "fast shutdown (SIGINT)"
        return f"postgresql {kind}, down {down_s:g}s", time.monotonic() - started

    def kill_sessions(self) -> tuple[str, None]:
        """``pg_terminate_backend`` of every session on the run's database: what a server's idle-session
        timeout or an operator does under the workers' and gateways' kept connections."""
        import psycopg

        self.down_at = time.monotonic()
        with psycopg.connect(self.server._conninfo("postgres"), autocommit=True) as conn:
            ended = conn.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                                 "WHERE datname = %s AND pid <> pg_backend_pid()", (self.name,)).fetchone()
        return f"{ended[0] if ended else 0} sessions on the audit database terminated", None

    def stop(self) -> None:
        self.server.stop()
