"""The Rego unit tests and the strict checker, run by OPA itself.

``tests/policy/test_rego_units.py`` runs the same ``*_test.rego`` rules through
regorus; running them on OPA too means a rule that only one engine reads
the intended way fails here or there, not in production.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.opa_fixtures import POLICY_DIR, ROOT


#: Relative, so that OPA's messages name files as a developer sees them.
POLICY_ARG = os.path.relpath(POLICY_DIR, ROOT)


def run_opa(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_opa_test_passes(opa_binary: Path) -> None:
    result = run_opa(opa_binary, "test", POLICY_ARG, "-v")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"opa test failed:\n{output}"
    passed = re.search(r"^PASS: (\d+)/(\d+)$", output, re.MULTILINE)
    assert passed and passed.group(1) == passed.group(2) and int(passed.group(1)) > 0, output


def test_opa_check_strict_is_clean(opa_binary: Path) -> None:
    result = run_opa(opa_binary, "check", "--strict", POLICY_ARG)
    assert result.returncode == 0, f"opa check --strict:\n{result.stdout}{result.stderr}"
