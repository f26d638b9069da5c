"""The shipped policy still decides the bench's inputs exactly as before it was made faster.

``bench_decisions.json`` holds the decision documents the shipped policy
gave each input of ``bench/policy_inputs.py`` before the decision rules were
rewritten to rely on data checked at load (tests/policy/test_config_at_load.py).
A rewrite that changes any allow, reason, message or obligation fails here.
To record a deliberate change of the policy's answers, regenerate the file
from the new policy and review the diff.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from bench.policy_inputs import sample_inputs
from gateway.policy.child import DECISION_RULE
from gateway.policy.unittests import build_engine
from tests.opa_fixtures import POLICY_DIR

RECORDED = json.loads((Path(__file__).parent / "bench_decisions.json").read_text(encoding="utf-8"))
SAMPLES = {sample.name: sample for sample in sample_inputs()}


@cache
def engine() -> Any:
    """One engine, on pytest's one thread (regorus engines stay on the thread that made them)."""
    return build_engine(POLICY_DIR)


def test_every_bench_input_has_a_recorded_decision() -> None:
    assert sorted(RECORDED) == sorted(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_bench_input_decided_as_recorded(name: str) -> None:
    engine().set_input_json(json.dumps(SAMPLES[name].input))
    assert json.loads(engine().eval_rule_as_json(DECISION_RULE)) == RECORDED[name]
