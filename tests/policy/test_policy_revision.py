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
from gateway.policy.revision import PolicyFilesError, PolicySnapshot, read_policy
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


def _snapshot(*modules: str) -> PolicySnapshot:
    return PolicySnapshot(modules=tuple((f"m{i}.rego", text) for i, text in enumerate(modules)), data=(),
                          revision="")


@pytest.mark.parametrize("text, defines", [
    ("package govgate\n\noutput_decision := {}\n", True),
    ("package govgate\n\nimport rego.v1\n\noutput_decision if true\n", True),
    ("package govgate\n\ndefault output_decision := {}\n", True),
    # the rule's document built by rules of its own package (allow, reasons, obligations)
    ("package govgate.output_decision\n\nallow := false if is_string(input.output.text)\n", True),
    ("package govgate.output_decision.parts\n\nallow := false\n", True),
    ("package govgate.output_decision # the output rule\n\nallow := false\n", True),
    ("package govgate # with a comment\n\noutput_decision := {}\n", True),
    ("package govgate\n\n# output_decision := {}\ndecision := {}\n", False),
    ("package govgate\n\noutput_decisions := {}\n", False),
    ("package govgate.output_decisions\n\nallow := false\n", False),
    ("package other.output_decision\n\nallow := false\n", False),
    ("package govgate.calendar\n\noutput_decision := {}\n", False),
])
def test_a_module_defines_a_rule_by_its_heads_or_its_package(text: str, defines: bool) -> None:
    assert _snapshot(text).defines_rule("govgate", "output_decision") is defines


def test_the_shipped_policy_defines_the_output_rule() -> None:
    assert read_policy(POLICY_DIR).defines_rule("govgate", "output_decision") is True


@pytest.mark.parametrize("data", [
    {"govgate": {"decision": {"allow": True, "reasons": [], "obligations": {}}}},  # the whole decision replaced
    {"govgate": {"model_permitted": True}},  # one rule flipped
    {"govgate": 5},  # a value where the package is
    {"govgate": {}},  # nothing yet, but under the package
])
def test_data_under_a_package_is_refused(policy_copy: Path, data: dict) -> None:
    """On regorus's interpreter a data document at a rule's path replaced the rule: one key in data.json
    turned the decision into "allow, no limits, no content rules"; OPA refuses such a folder (probe p3)."""
    document = json.loads((policy_copy / "data.json").read_text(encoding="utf-8"))
    (policy_copy / "data.json").write_text(json.dumps({**document, **data}), encoding="utf-8")
    with pytest.raises(PolicyFilesError, match=r"the data sets data\.govgate.*package govgate"):
        read_policy(policy_copy)
    sub = policy_copy / "govgate"  # a data file in a folder named as the package: data.govgate too
    (policy_copy / "data.json").write_text(json.dumps(document), encoding="utf-8")
    sub.mkdir()
    (sub / "data.json").write_text(json.dumps({"decision": {"allow": True}}), encoding="utf-8")
    with pytest.raises(PolicyFilesError, match="package govgate"):
        read_policy(policy_copy)
    (sub / "data.json").unlink()
    assert read_policy(policy_copy).revision == policy_revision(POLICY_DIR)


def test_a_symlinked_policy_folder_is_followed_when_it_is_switched(tmp_path: Path) -> None:
    """GOVGATE_POLICY_DIR resolved once at start read the old target for ever when the link was switched to
    a new release folder (probe p3): the setting keeps the link, each read follows it."""
    from gateway.settings import Settings

    old = Path(shutil.copytree(POLICY_DIR, tmp_path / "release-1"))
    new = Path(shutil.copytree(POLICY_DIR, tmp_path / "release-2"))
    with (new / "govgate.rego").open("a", encoding="utf-8") as f:
        f.write("\nrelease := 2\n")
    link = tmp_path / "current"
    link.symlink_to(old)
    settings = Settings.from_env({"GOVGATE_POLICY_DIR": str(link)})
    assert settings.policy_dir == link
    before = read_policy(settings.policy_dir).revision
    swap = tmp_path / "next"
    swap.symlink_to(new)
    swap.replace(link)  # atomic switch, as a deployment does it
    assert read_policy(settings.policy_dir).revision == policy_revision(new) != before
