"""Runs the Rego unit tests (``policies/**/*_test.rego``) through regorus.

``opa test policies/`` is the usual runner; this one makes the same tests run
wherever pytest runs, with no opa binary, and on the engine the gateway embeds.
Each ``test_`` rule becomes one pytest case that passes when the rule is true.
The modules and data are loaded exactly as the embedded engine loads them.
"""

from __future__ import annotations

import os

os.environ.setdefault("RUST_BACKTRACE", "0")
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

import re  # noqa: E402
from functools import cache  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import regorus  # noqa: E402

from gateway.policy import read_policy  # noqa: E402

POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"

# Rule heads start a line in opa-fmt'ed Rego; OPA runs rules named test_*.
_TEST_RULE = re.compile(r"^(test_\w+)\b", re.MULTILINE)
_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)


def rego_test_files() -> list[Path]:
    return sorted(p for p in POLICY_DIR.rglob("*_test.rego") if not any(s.startswith(".") for s in p.parts))


def discover() -> list[tuple[str, str, str]]:
    """``(file, package, rule)`` for every test rule, in file order."""
    found = []
    for path in rego_test_files():
        text = path.read_text(encoding="utf-8")
        package = _PACKAGE.search(text)
        assert package, f"{path} has no package line"
        names = dict.fromkeys(_TEST_RULE.findall(text))  # a rule may have several bodies
        rel = path.relative_to(POLICY_DIR).as_posix()
        found.extend((rel, package.group(1), name) for name in names)
    return found


CASES = discover()


@cache
def engine() -> Any:
    """One regorus Engine with every module, every test module and the data.

    Cached for the session: pytest runs these sync tests on one thread, the
    thread an Engine must stay on.
    """
    snapshot = read_policy(POLICY_DIR)
    rego = regorus.Engine()
    for rel, text in snapshot.modules:
        rego.add_policy(rel, text)
    for path in rego_test_files():
        rego.add_policy(path.relative_to(POLICY_DIR).as_posix(), path.read_text(encoding="utf-8"))
    for _, doc in snapshot.data_documents():
        rego.add_data(doc)
    return rego


def test_rego_unit_tests_were_found() -> None:
    assert len(CASES) >= 10, f"found only {CASES} under {POLICY_DIR}"


@pytest.mark.parametrize(("file", "package", "rule"), CASES, ids=[f"{f}::{r}" for f, _, r in CASES])
def test_rego(file: str, package: str, rule: str) -> None:
    result = engine().eval_rule(f"data.{package}.{rule}")
    assert result is True, f"{file}: {rule} is {'undefined (false)' if result is None else repr(result)}"
