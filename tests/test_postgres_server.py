"""tests/postgres_server.py itself: where it looks for PostgreSQL, whom it runs it as, what it says when absent."""

from __future__ import annotations

import os
import pwd

import psycopg
import pytest

from tests import postgres_server as pg_helper
from tests.postgres_server import PostgresServer, PostgresUnavailable


def test_no_binaries_is_a_clear_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pg_helper.EXTERNAL_URL_ENV, raising=False)
    monkeypatch.setattr(pg_helper, "find_bin_dir", lambda: None)
    with pytest.raises(PostgresUnavailable, match="install Debian's postgresql package"):
        PostgresServer.start()


def test_the_server_runs_as_an_unprivileged_user_when_we_are_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert pg_helper.server_user() is None  # not root: as ourselves
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    user = pg_helper.server_user()
    assert user is not None and user.pw_uid != 0 and user.pw_name in ("postgres", "nobody")


def test_the_session_server_runs_on_loopback_as_that_user(postgres_server: PostgresServer) -> None:
    url = postgres_server.fresh_database("probe")
    try:
        conninfo = f"host={postgres_server.host} port={postgres_server.port} user={postgres_server.user} dbname=postgres"
        with psycopg.connect(conninfo) as conn:
            listen, fsync = (conn.execute(f"SHOW {name}").fetchone()[0] for name in ("listen_addresses", "fsync"))
            [database] = conn.execute("SELECT datname FROM pg_database WHERE datname = %s",
                                      (url.rsplit("/", 1)[1],)).fetchone()
        assert (listen, fsync) == ("127.0.0.1", "off") and url.endswith(database)
        if postgres_server.process is not None:
            owner = os.stat(f"/proc/{postgres_server.process.pid}").st_uid
            assert owner == (os.geteuid() if os.geteuid() != 0 else pg_helper.server_user().pw_uid)  # type: ignore[union-attr]
            assert pwd.getpwuid(owner).pw_uid != 0
    finally:
        postgres_server.drop_database(url)
