"""A pytest plugin: the suite's scratch folders live in one private folder, and none is left behind.

Tests make short-path folders (``gg-*``: unix socket paths are limited to
~100 bytes, too short for pytest's ``tmp_path``) and so do processes they
start. This plugin points ``TMPDIR`` and :mod:`tempfile` at a private folder
for the session, so a ``gg-*`` folder found there at the end was left by this
session (not by another run sharing ``/tmp``), and the session fails naming
it. The private folder is removed at the end either way. Loaded from
``addopts`` (``-p tests.scratch_guard``); pytest's own ``tmp_path`` folders
stay where pytest keeps them.
"""

from __future__ import annotations

import multiprocessing.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

#: Prefix of the scratch folders tests make with ``tempfile.mkdtemp``.
SCRATCH_PREFIX = "gg-"

_STATE = pytest.StashKey[tuple[Path, str | None, str | None]]()


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has configured itself
def pytest_configure(config: pytest.Config) -> None:
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None:
        factory.getbasetemp()  # fixed now, so tmp_path stays outside the private folder
    # multiprocessing's own folder (tests/child_processes.py's fork server keeps its socket there) is made
    # outside the private one: multiprocessing removes it at exit, after this plugin has removed that.
    multiprocessing.util.get_temp_dir()
    root = Path(tempfile.mkdtemp(prefix="govgate-tests-"))
    config.stash[_STATE] = (root, os.environ.get("TMPDIR"), tempfile.tempdir)
    os.environ["TMPDIR"] = str(root)
    tempfile.tempdir = str(root)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None:
        return
    root, old_env, old_tempdir = state
    left = sorted(path.name for path in root.glob(f"{SCRATCH_PREFIX}*"))
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env
    tempfile.tempdir = old_tempdir
    shutil.rmtree(root, ignore_errors=True)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"the session left {len(left)} scratch folder(s) behind: {', '.join(left)} "
                   "(every test must remove the folders it makes)")
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
