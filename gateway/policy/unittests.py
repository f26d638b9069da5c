"""Running the Rego unit tests (``*_test.rego``) without an OPA binary.

``opa test policies/`` is the usual runner; this one runs the same test rules
through regorus, the engine the gateway embeds, so ``govgate policy test``
and the test suite work wherever Python does. Each ``test_`` rule passes
when it evaluates to true.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.policy.revision import read_policy

# Rule heads start a line in opa-fmt'ed Rego; OPA runs rules named test_*.
_TEST_RULE = re.compile(r"^(test_\w+)\b", re.MULTILINE)
_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)


@dataclass(frozen=True)
class RegoTest:
    file: str  # relative to the policy folder
    package: str
    rule: str


@dataclass(frozen=True)
class RegoTestResult:
    test: RegoTest
    passed: bool
    detail: str = ""


def test_files(policy_dir: Path) -> list[Path]:
    return sorted(p for p in policy_dir.rglob("*_test.rego")
                  if not any(part.startswith(".") for part in p.relative_to(policy_dir).parts))


def discover(policy_dir: Path) -> list[RegoTest]:
    """Every test rule, in file order."""
    found: list[RegoTest] = []
    for path in test_files(policy_dir):
        text = path.read_text(encoding="utf-8")
        package = _PACKAGE.search(text)
        if package is None:
            raise ValueError(f"{path} has no package line")
        rel = path.relative_to(policy_dir).as_posix()
        found.extend(RegoTest(rel, package.group(1), name) for name in dict.fromkeys(_TEST_RULE.findall(text)))
    return found


def build_engine(policy_dir: Path) -> Any:
    """A regorus Engine with the modules, the test modules and the data.

    Must be used only on the thread that called this (a regorus rule).
    """
    os.environ.setdefault("RUST_BACKTRACE", "0")
    os.environ.setdefault("RUST_LIB_BACKTRACE", "0")
    import regorus

    snapshot = read_policy(policy_dir)
    engine = regorus.Engine()
    for rel, text in snapshot.modules:
        engine.add_policy(rel, text)
    for path in test_files(policy_dir):
        engine.add_policy(path.relative_to(policy_dir).as_posix(), path.read_text(encoding="utf-8"))
    for _, document in snapshot.data_documents():
        engine.add_data(document)
    return engine


def run_test(engine: Any, test: RegoTest) -> RegoTestResult:
    try:
        value = engine.eval_rule(f"data.{test.package}.{test.rule}")
    except BaseException as exc:  # regorus panics are BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return RegoTestResult(test, False, f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}")
    if value is True:
        return RegoTestResult(test, True)
    return RegoTestResult(test, False, "undefined (false)" if value is None else f"evaluated to {value!r}")


def run_all(policy_dir: Path) -> list[RegoTestResult]:
    engine = build_engine(policy_dir)
    return [run_test(engine, test) for test in discover(policy_dir)]
