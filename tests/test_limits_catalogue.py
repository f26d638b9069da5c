"""The usage limits agree wherever they are named.

``gateway/limits/catalogue.py`` declares them; the policy (read here by
evaluating its rules with the embedded engine), the decision parser, the Lua
scripts, the shipped data and the README must say the same. A limit added in
one place and not the others fails here.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any, Sequence, get_args

import pytest

from gateway.limits import scripts
from gateway.limits.catalogue import (
    COUNTER_NAMES,
    LIMIT_CODES,
    LIMIT_NAMES,
    QUEUE_FULL,
    RETRY_HINTS,
    RETRYABLE_CODES,
    USAGE_FIELDS,
    USAGE_LIMITS,
    UsageLimit,
    Window,
)
from gateway.policy import Decision, MalformedDecision
from gateway.policy.decision import Limits
from gateway.policy.unittests import build_engine

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


@cache
def engine() -> Any:
    """One regorus engine over policies/ (sync tests run on one thread, as regorus requires)."""
    return build_engine(ROOT / "policies")


def rego(expression: str) -> Any:
    """The value of a Rego expression over the shipped policy and data; None when undefined."""
    results = engine().eval_query(f"x := {expression}")["result"]
    return results[0]["bindings"]["x"] if results else None


def as_check(limit: UsageLimit) -> dict[str, str]:
    """A catalogue entry in the shape of an entry of the policy's ``usage_checks``."""
    return {"limit": limit.name, "counter": limit.counter, "cost": limit.cost, "window": limit.window,
            "code": limit.code}


def differences(catalogue: Sequence[UsageLimit], usage_checks: Sequence[dict]) -> list[str]:
    """What the catalogue and the policy's ``usage_checks`` disagree on, one line each."""
    ours = {limit.name: as_check(limit) for limit in catalogue}
    theirs = {check.get("limit"): check for check in usage_checks}
    problems = [f"{name}: in the catalogue, not in usage_checks" for name in ours.keys() - theirs.keys()]
    problems += [f"{name}: in usage_checks, not in the catalogue" for name in theirs.keys() - ours.keys()]
    problems += [f"{name}: catalogue {ours[name]} != usage_checks {theirs[name]}"
                 for name in ours.keys() & theirs.keys() if ours[name] != theirs[name]]
    return sorted(problems)


def test_the_policy_checks_the_catalogue_limits() -> None:
    assert differences(USAGE_LIMITS, rego("data.govgate.usage_checks")) == []


def test_a_limit_missing_on_one_side_is_reported() -> None:
    """The comparison itself can fail: a dropped entry on either side and a changed code are named."""
    checks = [as_check(limit) for limit in USAGE_LIMITS]
    first, last = USAGE_LIMITS[0].name, USAGE_LIMITS[-1].name
    assert differences(USAGE_LIMITS, checks) == []
    assert differences(USAGE_LIMITS[:-1], checks) == [f"{last}: in usage_checks, not in the catalogue"]
    assert differences(USAGE_LIMITS, checks[1:]) == [f"{first}: in the catalogue, not in usage_checks"]
    changed = [{**checks[0], "code": "not_a_code"}, *checks[1:]]
    assert [line.split(":")[0] for line in differences(USAGE_LIMITS, changed)] == [first]


def test_the_policy_reads_every_limit_and_counter() -> None:
    assert sorted(rego("data.govgate.limit_names")) == sorted(LIMIT_NAMES)
    assert sorted(rego("data.govgate.usage_counters")) == sorted(USAGE_FIELDS)
    assert sorted(rego("data.govgate.counter_phrases")) == sorted(COUNTER_NAMES)


@pytest.mark.parametrize("window", get_args(Window))
def test_every_window_has_a_retry_rule_and_a_hint(window: str) -> None:
    assert isinstance(rego(f'data.govgate.retry_after_s("{window}", "principal")'), (int, float))
    assert RETRY_HINTS[window]


@pytest.mark.parametrize("cost", sorted({limit.cost for limit in USAGE_LIMITS}))
def test_every_cost_is_known_to_the_policy(cost: str) -> None:
    assert rego(f'data.govgate.request_cost("{cost}")') is not None
    assert rego(f'data.govgate.cost_phrase("{cost}")') is not None


def test_the_shipped_data_names_every_limit() -> None:
    limits = rego("data.govgate_config.limits")
    for kind in ("principals", "teams"):
        assert sorted(limits[kind]["default"]) == sorted(LIMIT_NAMES), kind


def test_the_decision_has_one_typed_field_per_limit() -> None:
    assert tuple(field.name for field in fields(Limits)) == LIMIT_NAMES


@pytest.mark.parametrize("name", LIMIT_NAMES)
def test_the_decision_parser_requires_every_limit(name: str) -> None:
    entry = {limit: 1 for limit in LIMIT_NAMES}
    doc = {"allow": True, "reasons": [],
           "obligations": {"max_tokens": 1, "prompt_logging": "full", "limits": {"principal": entry, "team": None}}}
    assert Decision.from_document(doc).obligations.limits.principal == Limits(**entry)
    del entry[name]
    with pytest.raises(MalformedDecision, match=name):
        Decision.from_document(doc)


def test_the_lua_scripts_keep_the_catalogue_counters_in_order() -> None:
    assert scripts.COUNTERS == COUNTER_NAMES


def test_the_retryable_codes_are_the_limit_codes_and_queue_full() -> None:
    assert LIMIT_CODES == {"rate_limited", "budget_exceeded", "too_many_in_flight"}
    assert RETRYABLE_CODES == LIMIT_CODES | {QUEUE_FULL}


def test_the_readme_names_every_limit_and_code() -> None:
    missing = [name for name in (*LIMIT_NAMES, *RETRYABLE_CODES) if f"`{name}`" not in README]
    assert missing == []


def test_the_policy_evaluator_does_not_load_redis() -> None:
    """The decision parser reads the catalogue; the evaluator processes it runs in stay light."""
    code = "import sys, gateway.policy.child; assert 'redis' not in sys.modules, 'redis imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
