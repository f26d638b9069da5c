"""How every SQLite connection to the audit store is set up, with or without SQLAlchemy.

:func:`audit.db.make_engine` runs it on each connection its pool makes, and
:mod:`audit.driver_store` on the connection it makes itself: one set of
PRAGMAs whichever way a process reaches the file (see :func:`audit.db.make_engine`
for why each is there).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Final

#: SQLite's page cache per connection, in KiB (SQLite's default is 2000). The appends touch a handful of
#: pages each (the head, the indexes' leaves), reads page through ranges once, and the OS caches the file
#: anyway: measured (bench/audit_append.py) no dearer per append at 512 than at 2000, while the API's
#: pooled connections held ~5 MB less after 20k requests (bench/startup.py --requests 20000).
SQLITE_CACHE_KIB: Final = 512


def configure_sqlite_connection(dbapi_conn: Any, busy_timeout_s: float) -> None:
    """pysqlite's own BEGIN switched off (the caller issues BEGIN or BEGIN IMMEDIATE), then the PRAGMAs."""
    dbapi_conn.isolation_level = None
    busy_ms = max(1, round(busy_timeout_s * 1000))
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # Switching to WAL needs a write; skip it when already WAL so that
        # read-only connections to a WAL database still open.
        (mode,) = cursor.execute("PRAGMA journal_mode").fetchone()
        if mode.lower() not in ("wal", "memory"):
            _switch_to_wal(cursor, busy_timeout_s)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        # Whatever any connection frees (a page split moving cells, a migration's dropped table) is
        # zeroed, so an erased prompt leaves no copy in free space: SQLite's own default is off unless
        # built with SQLITE_SECURE_DELETE (Debian's is; python.org's and Homebrew's are not).
        cursor.execute("PRAGMA secure_delete = ON")
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any, busy_timeout_s: float) -> None:
    """``PRAGMA journal_mode = WAL``, retried while other connections hold the file.

    SQLite answers this pragma with "database is locked" straight away, without
    consulting the busy handler, when another process has the file open at the
    same moment (e.g. several workers opening a fresh database together).
    """
    deadline = time.monotonic() + busy_timeout_s
    delay = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL").fetchone()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
