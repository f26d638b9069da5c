"""``audit.migration_heads``: a schema at head is told without Alembic, and told the way Alembic would.

The check replaces an Alembic upgrade only when it is sure there is nothing
to do; these tests hold its reading of the revision files to Alembic's own,
show it sends every unclear case to Alembic, and show a process opening a
current database (SQLite and PostgreSQL) never imports Alembic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

from audit import make_engine, migrate
from audit.db import MIGRATIONS_DIR as AUDIT_MIGRATIONS, VERSION_TABLE as AUDIT_VERSION_TABLE, alembic_config
from audit.migration_heads import at_head, script_heads
from gateway.db_setup import MIGRATIONS_DIR as GATEWAY_MIGRATIONS, alembic_config as gateway_alembic_config
from gateway.db_setup import migrate_gateway

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("folder, config", [(AUDIT_MIGRATIONS, alembic_config),
                                            (GATEWAY_MIGRATIONS, gateway_alembic_config)],
                         ids=["audit", "gateway"])
def test_the_heads_read_from_the_files_are_alembics(folder: Path, config) -> None:
    alembic_heads = frozenset(ScriptDirectory.from_config(config()).get_heads())
    assert alembic_heads  # a folder with revisions
    assert script_heads(folder / "versions") == alembic_heads


def _revision_file(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(f'"""A revision."""\nfrom typing import Union\n{body}\n'
                                       "def upgrade() -> None:\n    pass\n")


def test_a_branch_and_its_merge(tmp_path: Path) -> None:
    _revision_file(tmp_path, "a", 'revision: str = "a"\ndown_revision = None')
    _revision_file(tmp_path, "b", 'revision = "b"\ndown_revision: Union[str, None] = "a"')
    _revision_file(tmp_path, "c", 'revision = "c"\ndown_revision = "a"')
    (tmp_path / "__init__.py").write_text("")
    assert script_heads(tmp_path) == {"b", "c"}  # two branches: two heads
    _revision_file(tmp_path, "d", 'revision = "d"\ndown_revision = ("b", "c")')
    assert script_heads(tmp_path) == {"d"}


@pytest.mark.parametrize("body", ['revision = make_id()\ndown_revision = None',  # not a literal
                                  'down_revision = None',  # no revision at all
                                  'revision = "x"\ndown_revision = 3',  # not a revision name
                                  'revision = "x"\ndown_revision = (',  # not Python
                                  ], ids=["computed", "missing", "odd-parent", "syntax"])
def test_a_file_read_plainly_or_not_at_all(tmp_path: Path, body: str) -> None:
    """Anything but plain literals: no answer, so the caller runs Alembic."""
    _revision_file(tmp_path, "a", 'revision = "a"\ndown_revision = None')
    _revision_file(tmp_path, "odd", body)
    assert script_heads(tmp_path) is None


def test_an_empty_folder_has_no_heads(tmp_path: Path) -> None:
    assert script_heads(tmp_path) is None


def test_at_head_only_when_the_version_table_holds_exactly_the_heads(store_url: str) -> None:
    engine = make_engine(store_url)
    versions = AUDIT_MIGRATIONS / "versions"
    try:
        with engine.connect() as conn:
            assert at_head(conn, versions, AUDIT_VERSION_TABLE)
            assert not at_head(conn, versions, "alembic_version_nothing_here")  # never migrated
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {AUDIT_VERSION_TABLE} SET version_num = 'audit_0004'"))
        with engine.connect() as conn:
            assert not at_head(conn, versions, AUDIT_VERSION_TABLE)  # behind: Alembic's to do
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {AUDIT_VERSION_TABLE} SET version_num = 'audit_0005'"))
            conn.execute(text(f"INSERT INTO {AUDIT_VERSION_TABLE} (version_num) VALUES ('elsewhere_0001')"))
        with engine.connect() as conn:
            assert not at_head(conn, versions, AUDIT_VERSION_TABLE)  # a head this code does not know
    finally:
        engine.dispose()


_OPEN_CURRENT = """
import json, sys
from audit import make_engine, migrate
from gateway.db_setup import migrate_gateway
engine = make_engine(sys.argv[1])
migrate(engine)
migrate_gateway(engine)
engine.dispose()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("alembic", "mako", "pygments"))))
"""


def test_opening_a_current_database_never_imports_alembic(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        migrate(engine)
        migrate_gateway(engine)  # the gateway's tables too: now both are current
    finally:
        engine.dispose()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _OPEN_CURRENT, store_url], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_a_database_behind_is_still_migrated_by_alembic(db_url: str) -> None:
    """A fresh database (no version tables) goes the old way: Alembic creates both schemas."""
    engine = make_engine(db_url)
    try:
        migrate(engine)
        migrate_gateway(engine)
        with engine.connect() as conn:
            assert at_head(conn, AUDIT_MIGRATIONS / "versions", AUDIT_VERSION_TABLE)
            assert at_head(conn, GATEWAY_MIGRATIONS / "versions", "alembic_version_gateway")
            assert conn.execute(text("SELECT count(*) FROM api_keys")).scalar() == 0
    finally:
        engine.dispose()
