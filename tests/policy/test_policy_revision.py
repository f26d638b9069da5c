"""Which files make a policy, and the revision that names them (``gateway/policy/revision.py``).

The revision is recorded with every audit entry, so it must change with any
module or data change and with nothing else (tests, hidden files, notes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.policy import policy_files, policy_revision
from tests.opa_fixtures import POLICY_DIR


@pytest.fixture
def policy_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(POLICY_DIR, tmp_path / "policies"))


def test_policy_files_are_modules_and_data_without_tests(policy_copy: Path) -> None:
    (policy_copy / ".hidden.rego").write_text("package x\n")
    names = [p.name for p in policy_files(policy_copy)]
    assert "govgate.rego" in names and "data.json" in names
    assert not [n for n in names if n.endswith("_test.rego") or n.startswith(".")]


def test_revision_changes_when_a_module_changes(policy_copy: Path) -> None:
    before = policy_revision(policy_copy)
    with (policy_copy / "govgate.rego").open("a") as f:
        f.write("\n# edited\n")
    assert policy_revision(policy_copy) != before


def test_revision_changes_when_data_changes(policy_copy: Path) -> None:
    before = policy_revision(policy_copy)
    data = json.loads((policy_copy / "data.json").read_text())
    data["govgate_config"]["roles"]["analyst"]["max_tokens"] = 512
    (policy_copy / "data.json").write_text(json.dumps(data))
    assert policy_revision(policy_copy) != before


def test_revision_changes_when_a_module_is_renamed(policy_copy: Path) -> None:
    before = policy_revision(policy_copy)
    (policy_copy / "govgate.rego").rename(policy_copy / "main.rego")
    assert policy_revision(policy_copy) != before


def test_revision_ignores_tests_and_hidden_files(policy_copy: Path) -> None:
    before = policy_revision(policy_copy)
    with (policy_copy / "govgate_test.rego").open("a") as f:
        f.write("\ntest_added if true\n")
    (policy_copy / ".regal.yaml").write_text("rules: {}\n")
    (policy_copy / "README.md").write_text("notes\n")
    assert policy_revision(policy_copy) == before


def test_revision_is_stable(policy_copy: Path) -> None:
    assert policy_revision(policy_copy) == policy_revision(POLICY_DIR)
