"""Whether a database's schema is already at its migrations' head, told without importing Alembic.

Every process that opens the database migrates first, and nearly always
there is nothing to do. Alembic, with Mako and Pygments behind it, is about
11 MB that stay resident for the process's life once imported: in the API,
a tenth of its memory, for a check that comes out "current" at every start
but the first after an upgrade. So the check is made here, with the
standard library: the head revisions are read from the revision files'
``revision`` / ``down_revision`` assignments (parsed with :mod:`ast`, never
executed), the stored ones from the version table; only when they differ,
or anything is unclear, does the caller run Alembic as before.

``tests/audit/test_migration_heads.py`` holds this reading to Alembic's own
(``ScriptDirectory.get_heads``) for both packages' folders.
"""

from __future__ import annotations

import ast
import functools
import threading
from pathlib import Path

from sqlalchemy import Connection, column, inspect, select, table

#: The assignments of an Alembic revision file this module reads.
_REVISION, _DOWN = "revision", "down_revision"


def _assigned(tree: ast.Module) -> dict[str, object]:
    """The module-level ``name = literal`` (or ``name: type = literal``) assignments of the two names."""
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in (_REVISION, _DOWN):
            found[target.id] = ast.literal_eval(value)
    return found


#: CPython 3.11 (to 3.11.8) can raise ``SystemError: AST constructor recursion depth mismatch`` when two
#: threads build AST objects at once (a worker's start migrating in a thread while another thread does the
#: same, or pytest rewrites a module): the parses here take turns, and each file is parsed once per version.
_PARSE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=64)
def _file_assignments(path: str, _mtime_ns: int, _size: int) -> dict[str, object]:
    with _PARSE_LOCK:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    return _assigned(tree)


def script_heads(versions_dir: Path) -> frozenset[str] | None:
    """The head revisions of a folder of Alembic revision files; None when a file cannot be read plainly.

    A head is a revision no other revision names as its ``down_revision``.
    None (a file without a literal ``revision``, a parse error) sends the
    caller to Alembic, which knows every form a revision file may take.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted(versions_dir.glob("*.py")):
        if path.name.startswith("__"):
            continue
        try:
            stat = path.stat()
            found = _file_assignments(str(path), stat.st_mtime_ns, stat.st_size)
        except (OSError, SyntaxError, ValueError):
            return None
        revision, down = found.get(_REVISION), found.get(_DOWN)
        if not isinstance(revision, str):
            return None
        revisions.add(revision)
        if isinstance(down, str):
            parents.add(down)
        elif isinstance(down, (tuple, list)) and all(isinstance(d, str) for d in down):
            parents.update(down)
        elif down is not None:
            return None
    return frozenset(revisions - parents) or None


def stored_revisions(conn: Connection, version_table: str) -> frozenset[str] | None:
    """The revisions a version table holds; None when the table does not exist (nothing migrated yet)."""
    if not inspect(conn).has_table(version_table):
        return None
    rows = conn.execute(select(column("version_num")).select_from(table(version_table))).scalars()
    return frozenset(rows)


def at_head(conn: Connection, versions_dir: Path, version_table: str) -> bool:
    """True only when the version table holds exactly the folder's heads (then there is nothing to migrate)."""
    heads = script_heads(versions_dir)
    return heads is not None and stored_revisions(conn, version_table) == heads
