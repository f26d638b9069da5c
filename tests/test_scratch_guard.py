"""The suite's guard against scratch folders left behind (``tests/scratch_guard.py``), run on a throwaway suite."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_a_session_that_leaves_a_scratch_folder_fails(tmp_path):
    """The suite's own guard (tests/scratch_guard.py): a leaked ``gg-*`` folder fails the session."""
    root = ROOT
    (tmp_path / "test_leaky.py").write_text(
        "import tempfile\n\ndef test_leaks():\n    tempfile.mkdtemp(prefix='gg-leak-')\n\n"
        "def test_tidy():\n    import shutil\n    shutil.rmtree(tempfile.mkdtemp(prefix='gg-tidy-'))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    leaky = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.scratch_guard",
                            "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py")],
                           env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert leaky.returncode == 1, leaky.stdout + leaky.stderr
    assert "2 passed" in leaky.stdout
    assert "left 1 scratch folder(s) behind: gg-leak-" in leaky.stdout
    tidy = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.scratch_guard",
                           "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py"),
                           "-k", "tidy"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert tidy.returncode == 0, tidy.stdout + tidy.stderr
