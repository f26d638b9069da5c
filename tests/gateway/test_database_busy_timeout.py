"""``GOVGATE_DATABASE_BUSY_TIMEOUT_S`` reaches every process that opens the audit store.

The gateway (:func:`gateway.db_setup.open_database`), the CLI commands
(:func:`govgate.cli_common.audit_engine`), and the worker's pool processes
and store preparation (its migration) make their engines with it; the
engine keeps it (:func:`audit.db.busy_timeout_s`) for SQLite's busy handler
and the writer's wait alike (tests/audit/test_busy_timeout.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import audit
from audit.db import busy_timeout_s
from gateway.db_setup import open_database
from gateway.settings import Settings, SettingsError


def _pragma_busy_timeout(engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("PRAGMA busy_timeout").scalar()


def test_the_setting_is_read_and_defaults_to_thirty_seconds() -> None:
    assert Settings.from_env({}).database_busy_timeout_s == 30.0
    assert Settings.from_env({"GOVGATE_DATABASE_BUSY_TIMEOUT_S": " 2.5 "}).database_busy_timeout_s == 2.5
    assert Settings.from_env({"GOVGATE_DATABASE_BUSY_TIMEOUT_S": ""}).database_busy_timeout_s == 30.0
    assert Settings.from_env({"GOVGATE_DATABASE_BUSY_TIMEOUT_S": "86400"}).database_busy_timeout_s == 86400.0


def test_a_child_process_reads_back_the_same() -> None:
    settings = Settings().with_(database_busy_timeout_s=4.25)
    assert Settings.from_env(settings.to_env()).database_busy_timeout_s == 4.25


@pytest.mark.parametrize(("value", "problem"), [("0", "more than 0"), ("-3", "more than 0"),
                                                ("soon", "not a number"), ("nan", "more than 0"),
                                                ("inf", "more than 0"), ("86401", "at most 86400")])
def test_unusable_values_are_refused_naming_the_variable(value: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=f"GOVGATE_DATABASE_BUSY_TIMEOUT_S='{value}'.*{problem}"):
        Settings.from_env({"GOVGATE_DATABASE_BUSY_TIMEOUT_S": value})


def test_the_gateways_database_waits_as_configured(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'gw.db'}",
                        database_busy_timeout_s=2.5)
    engine = open_database(settings)  # migrates both schemas on it, as the gateway's start does
    try:
        assert busy_timeout_s(engine) == 2.5
        assert _pragma_busy_timeout(engine) == 2500
    finally:
        engine.dispose()


def test_the_cli_opens_the_store_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from govgate.cli_common import audit_engine

    made = audit.make_engine(f"sqlite:///{tmp_path / 'cli.db'}")
    audit.migrate(made)  # the audit commands read a store the gateway made; they make none
    made.dispose()
    monkeypatch.setenv("GOVGATE_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("GOVGATE_DATABASE_BUSY_TIMEOUT_S", "1.5")
    engine = audit_engine()
    try:
        assert busy_timeout_s(engine) == 1.5
        assert _pragma_busy_timeout(engine) == 1500
    finally:
        engine.dispose()


class _Recorder:
    """``make_engine`` that notes each engine's busy timeout as the engine reports it."""

    def __init__(self) -> None:
        self.real = audit.make_engine
        self.seen: list[tuple[float, int]] = []

    def __call__(self, url: str, **kwargs):
        engine = self.real(url, **kwargs)
        self.seen.append((busy_timeout_s(engine), _pragma_busy_timeout(engine)))
        return engine


def test_the_worker_prepares_its_store_and_appends_with_it(tiny_spec, redis_server, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import pool, store_prep
    from workers.runtime import WorkerConfig

    config = WorkerConfig(model=tiny_spec, redis_url=redis_server.url, database_url=f"sqlite:///{tmp_path / 'w.db'}",
                          database_busy_timeout_s=3.5, payload_key_file=tmp_path / "payload.key",
                          digest_key_file=tmp_path / "digest.key")
    recorder = _Recorder()
    monkeypatch.setattr(audit, "make_engine", recorder)  # store_prep imports it when it runs
    plan = store_prep.ready_store(config)  # the migration child's work, run here
    for name in ("config", "model", "store", "redis", "sealer", "digester", "pending", "worker"):
        monkeypatch.setattr(pool._state, name, getattr(pool._state, name))  # restored after the test
    pool.load(config, plan)  # what each pool process does once, with the plan the child handed back
    try:
        assert recorder.seen == [(3.5, 3500)]  # the child's engine; the worker's process makes none
        assert plan.busy_timeout_s == 3.5
        store = pool._state.store
        assert store is not None
        store.append("request", "r-busy", principal="p", team=None, model="m", body={}, policy_revision=None)
        # The driver connection the jobs append on waits as long for SQLite's lock as the engines do.
        assert store._connection.run((), lambda cursor: cursor.execute("PRAGMA busy_timeout").fetchone()[0]) == 3500
    finally:
        pool.dispose()
