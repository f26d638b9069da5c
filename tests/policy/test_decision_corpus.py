"""The shipped policy decides 1,200 varied inputs exactly as recorded, on regorus and on OPA.

The corpus (``decision_corpus.py``) covers the bench inputs, the case tables
and a seeded draw of well-formed and malformed inputs; ``decision_corpus.json``
holds a digest of each decision and model list. A rewrite of the rules for
speed that changes any allow, reason, message or obligation fails here,
naming the inputs and showing what the policy now answers.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from gateway.policy.child import DECISION_RULE, VISIBLE_MODELS_RULE
from gateway.policy.unittests import build_engine
from tests.opa_fixtures import POLICY_DIR, OpaServer
from tests.policy.decision_corpus import RECORDED, SIZE, corpus, digest, models_input

EXPECTED: dict[str, dict[str, str]] = json.loads(RECORDED.read_text(encoding="utf-8"))
#: How many differing inputs a failure shows in full.
SHOWN = 5


def _report(answers: dict[str, dict[str, Any]]) -> list[str]:
    """One line per input whose answers' digests differ from the recorded ones."""
    lines = []
    for name, values in answers.items():
        for key, value in values.items():
            if digest(value) != EXPECTED[name][key]:
                lines.append(f"{name}: {key} now {json.dumps(value, sort_keys=True)[:600]}")
    return lines


def _failure(engine: str, lines: list[str]) -> str:
    return f"{len(lines)} answers differ from the recording on {engine}:\n" + "\n".join(lines[:SHOWN])


def test_the_corpus_is_the_recorded_one() -> None:
    names = [name for name, _ in corpus()]
    assert len(names) == SIZE == len(set(names))
    assert sorted(names) == sorted(EXPECTED)


def _variety(decisions: list[dict[str, Any]]) -> tuple[int, int, set[str]]:
    """(allowed, allowed with something to redact, reason codes seen)."""
    allowed = sum(1 for d in decisions if d["allow"])
    redacted = sum(1 for d in decisions if d["allow"] and d["obligations"]["redact"])
    return allowed, redacted, {reason["code"] for d in decisions for reason in d["reasons"]}


def test_regorus_decides_the_corpus_as_recorded() -> None:
    engine = build_engine(POLICY_DIR)
    answers = {}
    for name, document in corpus():
        engine.set_input_json(json.dumps(document))
        decision = json.loads(engine.eval_rule_as_json(DECISION_RULE))
        engine.set_input_json(json.dumps(models_input(document)))
        models = sorted(json.loads(engine.eval_rule_as_json(VISIBLE_MODELS_RULE)))
        answers[name] = {"decision": decision, "visible_models": models}
    lines = _report(answers)
    assert lines == [], _failure("regorus", lines)
    # The corpus is varied: allows, redactions and every family of denial are well represented.
    allowed, redacted, codes = _variety([answer["decision"] for answer in answers.values()])
    assert allowed >= 100 and redacted >= 10
    assert {"invalid_input", "model_not_allowed", "team_model_not_allowed", "unknown_role", "rate_limited",
            "budget_exceeded", "too_many_in_flight", "pii_detected", "blocked_content", "outside_hours",
            "purpose_required", "purpose_not_allowed"} <= codes


@pytest.fixture(scope="module")
def opa_url(opa_binary: Any, opa_log_dir: Any) -> Any:
    """An OPA server that loaded ``policies/`` itself, as in production."""
    server = OpaServer(opa_binary, opa_log_dir, POLICY_DIR).start()
    yield server.url
    server.stop()


def test_opa_decides_the_corpus_as_recorded(opa_url: str) -> None:
    answers = {}
    with httpx.Client(base_url=opa_url, timeout=30.0) as client:
        for name, document in corpus():
            decision = client.post("/v1/data/govgate/decision", json={"input": document}).json().get("result")
            models = client.post("/v1/data/govgate/visible_models",
                                 json={"input": models_input(document)}).json().get("result")
            answers[name] = {"decision": decision, "visible_models": sorted(models or [])}
    lines = _report(answers)
    assert lines == [], _failure("OPA", lines)
