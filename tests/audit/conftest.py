"""The audit tests run against both backends: a SQLite file and a real PostgreSQL database.

A test that asks for ``store`` (or ``store_url``, ``db_url``, ``raw``) runs
twice, ``[sqlite]`` and ``[postgresql]``; each run gets a database of its own
(a fresh file, or a fresh database on the session's server from
``tests/postgres_server.py``). Tests about SQLite itself (pragmas, file
modes) keep their own SQLite fixtures in their modules.

``raw`` reaches the database behind the store's back, as an attacker or a
careless administrator with database access would: plain SQL on a plain
SQLAlchemy engine, with helpers for the few statements that differ between
the backends (switching the append-only triggers off, reading a body's text).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, inspect, text

from audit import AuditStore, make_engine, migrate
from tests.postgres_server import PostgresServer

BACKENDS = ("sqlite", "postgresql")
#: The append-only tables, whose guard triggers :meth:`RawDB.without_guards` gets out of the way.
GUARDED_TABLES = ("audit_entries", "audit_checkpoints", "audit_closing_marks")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which database the test runs on."""
    return request.param


def _migrated_template(url: str) -> str:
    """Migrate the empty database at ``url`` into a template for :func:`store_url`.

    Migrating costs each test 0.05 s on SQLite and 0.12 s on PostgreSQL
    (hundreds of tests ask for a store); a copy is the same schema and rows
    (a file copy; ``CREATE DATABASE … TEMPLATE``), still a database of the
    test's own. Nobody stays connected to a template (PostgreSQL refuses to
    copy a database in use).
    """
    engine = make_engine(url)
    try:
        migrate(engine)
        if engine.dialect.name == "sqlite":  # everything into the file itself: only the file is copied
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def _sqlite_store_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _migrated_template(f"sqlite:///{tmp_path_factory.mktemp('audit-template') / 'audit.db'}")


@pytest.fixture(scope="session")
def _postgresql_store_template(postgres_server: PostgresServer) -> Iterator[str]:
    url = _migrated_template(postgres_server.fresh_database("audit_template"))
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def new_db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """Make databases on the backend, empty (unmigrated) or a copy of ``template``; all dropped at the end."""
    made: list[str] = []
    server: PostgresServer | None = request.getfixturevalue("postgres_server") if backend == "postgresql" else None

    def make(template: str | None = None) -> str:
        if server is None:
            path = tmp_path / f"db{len(made)}" / "audit.db"
            url = f"sqlite:///{path}"
            if template is not None:  # private, as make_engine creates them (folder 0700, file 0600)
                path.parent.mkdir(mode=0o700)
                shutil.copyfile(template.removeprefix("sqlite:///"), path)
                os.chmod(path, 0o600)
        else:
            url = server.fresh_database("audit", template=template)
        made.append(url)
        return url

    yield make
    if server is not None:
        for url in made:
            server.drop_database(url)


@pytest.fixture
def db_url(new_db_url: Callable[[], str]) -> str:
    """An empty database (no schema yet)."""
    return new_db_url()


@pytest.fixture
def store_url(new_db_url: Callable[..., str], backend: str, request: pytest.FixtureRequest) -> str:
    """A database with the audit schema, empty: a copy of the backend's migrated template.

    A test that also has ``db_url`` gets that database migrated, as before
    (the two are one database for it).
    """
    if "db_url" in request.fixturenames:
        url = request.getfixturevalue("db_url")
        engine = make_engine(url)
        try:
            migrate(engine)
        finally:
            engine.dispose()
        return url
    return new_db_url(template=request.getfixturevalue(f"_{backend}_store_template"))


@pytest.fixture
def store(store_url: str) -> Iterator[AuditStore]:
    store = AuditStore(make_engine(store_url))
    yield store
    store.engine.dispose()


class RawDB:
    """Plain SQL on the store's database, outside the store (no locks, no hooks)."""

    def __init__(self, url: str, backend: str) -> None:
        self.url = url
        self.backend = backend
        self.engine: Engine = make_engine(url) if backend == "sqlite" else create_engine(url)
        self._stores: list[AuditStore] = []

    def store(self) -> AuditStore:
        """A new store on this database (its own engine, as another process would have)."""
        self._stores.append(AuditStore(make_engine(self.url)))
        return self._stores[-1]

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """Run statements in one committed transaction (``;``-free statements, one at a time)."""
        with self.engine.begin() as conn:
            conn.execute(text(sql), params or {})

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), params or {})]

    def stored_rows(self) -> list[tuple[Any, ...]]:
        """``(seq, created_at, body text as stored, prev_hash, hash)`` of every entry, in seq order.

        ``CAST(body AS TEXT)`` is the stored text on both: SQLite keeps JSON as
        text, and PostgreSQL's ``json`` (not ``jsonb``) keeps its input verbatim.
        """
        return self.rows("SELECT seq, created_at, CAST(body AS TEXT), prev_hash, hash FROM audit_entries ORDER BY seq")

    def without_guards(self, *statements: str, params: dict[str, Any] | None = None) -> None:
        """Run statements with the append-only triggers out of the way, as someone with DDL rights would."""
        with self.engine.begin() as conn:
            if self.backend == "sqlite":
                for (name,) in conn.execute(text(
                        "SELECT name FROM sqlite_master WHERE type = 'trigger'"
                        f" AND tbl_name IN {tuple(GUARDED_TABLES)!r}")):
                    conn.execute(text(f'DROP TRIGGER "{name}"'))
            else:
                present = [t for t in GUARDED_TABLES if inspect(conn).has_table(t)]  # an older schema has fewer
                for table in present:
                    conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            for statement in statements:
                conn.execute(text(statement), params or {})
            if self.backend == "postgresql":
                for table in present:
                    conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))

    def dispose(self) -> None:
        for store in self._stores:
            store.engine.dispose()
        self.engine.dispose()


@pytest.fixture
def raw(store_url: str, backend: str) -> Iterator[RawDB]:
    """The store's database, reached directly (see :class:`RawDB`)."""
    db = RawDB(store_url, backend)
    yield db
    db.dispose()


@pytest.fixture(scope="module")
def _seeded_templates() -> Iterator[dict[tuple[str, str], tuple[str, PostgresServer | None]]]:
    """The module's seeded stores (:func:`seeded_raw`), by backend and seed; dropped with the module."""
    made: dict[tuple[str, str], tuple[str, PostgresServer | None]] = {}
    yield made
    for url, server in made.values():
        if server is not None:
            server.drop_database(url)


@pytest.fixture
def seeded_raw(backend: str, new_db_url: Callable[..., str], request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory,
               _seeded_templates: dict[tuple[str, str], tuple[str, PostgresServer | None]],
               ) -> Iterator[Callable[[Callable[[RawDB], None]], RawDB]]:
    """``seeded_raw(seed)``: a store of the test's own holding what ``seed(raw)`` appends.

    ``seed`` runs once per module and backend, on a template; each test gets
    a copy (as :func:`store_url` copies the empty one), so tests that tamper
    with it never see each other's changes. The entries' times are those of
    the seeding, earlier in the module.
    """
    opened: list[RawDB] = []

    def make(seed: Callable[[RawDB], None]) -> RawDB:
        key = (backend, f"{seed.__module__}.{seed.__qualname__}")
        if key not in _seeded_templates:
            empty = request.getfixturevalue(f"_{backend}_store_template")
            server: PostgresServer | None = None
            if backend == "sqlite":
                path = tmp_path_factory.mktemp("seeded") / "audit.db"
                shutil.copyfile(empty.removeprefix("sqlite:///"), path)
                os.chmod(path, 0o600)
                url = f"sqlite:///{path}"
            else:
                server = request.getfixturevalue("postgres_server")
                url = server.fresh_database("seeded", template=empty)
            template = RawDB(url, backend)
            try:
                seed(template)
            finally:
                template.dispose()
            _seeded_templates[key] = (_migrated_template(url), server)  # (checkpointed; migrating again is a no-op)
        opened.append(RawDB(new_db_url(template=_seeded_templates[key][0]), backend))
        return opened[-1]

    yield make
    for raw in opened:
        raw.dispose()

