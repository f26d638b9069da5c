"""Runs the Rego unit tests (``policies/**/*_test.rego``) through regorus.

``opa test policies/`` is the usual runner (tests/policy/test_rego_opa.py runs it
where an opa binary exists); this makes the same tests run wherever pytest
runs, on the engine the gateway embeds, one pytest case per Rego test rule.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

from gateway.policy.unittests import build_engine, discover, run_test
from tests.opa_fixtures import POLICY_DIR

CASES = discover(POLICY_DIR)


@cache
def engine() -> Any:
    """One engine for the session: pytest runs these sync tests on one thread, as regorus requires."""
    return build_engine(POLICY_DIR)


def test_rego_unit_tests_were_found() -> None:
    assert len(CASES) >= 10, f"found only {CASES} under {POLICY_DIR}"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.file}::{c.rule}" for c in CASES])
def test_rego(case) -> None:
    result = run_test(engine(), case)
    assert result.passed, f"{case.file}: {case.rule}: {result.detail}"


def test_a_false_rego_test_fails(tmp_path) -> None:
    """The runner must be able to fail: a test rule that is false is reported as failed."""
    (tmp_path / "p.rego").write_text("package demo\n\nimport rego.v1\n\nanswer := 41\n")
    (tmp_path / "p_test.rego").write_text("package demo_test\n\nimport rego.v1\n\n"
                                          "test_answer if data.demo.answer == 42\n")
    (tmp_path / "data.json").write_text("{}")
    [case] = discover(tmp_path)
    result = run_test(build_engine(tmp_path), case)
    assert not result.passed and "undefined" in result.detail
