"""The output decision: its parser, and ``decide_output`` on both engines (regorus and an OPA server).

Every way a policy can fail to answer about an output (no output decision
for this input, a wrong shape, a timeout) must come back as a stop; a policy
written before output rules (no ``output_decision`` at all) lets outputs
through. What the shipped rules decide is in ``policies/output_test.rego``
and the case table (``tests/policy_cases/outputs.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from gateway.policy import (
    POLICY_ERROR,
    POLICY_UNAVAILABLE,
    Decision,
    EmbeddedPolicyEngine,
    MalformedDecision,
    Obligations,
    OpaPolicyEngine,
    OutputDecision,
    PolicyEngine,
    Reason,
    Redaction,
)
from gateway.policy.opa import OpaAddress
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.requests.output_input import output_policy_input
from tests.opa_fixtures import POLICY_DIR
from tests.policy.embedded_fixtures import ALLOW, SLOW, request_input, write_policy

pytestmark = pytest.mark.anyio

TIMEOUT_S = 5.0
SHORT_TIMEOUT_S = 0.5
STOP = '{"allow": false, "reasons": [{"code": "x", "message": "y"}], "obligations": {}}'
OBLIGATIONS = {"max_tokens": 100, "prompt_logging": "full"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def window(text: str, roles: list[str], *, offset: int = 0, final: bool = True) -> dict[str, Any]:
    """The output input for ``text`` as the gateway builds it, for a principal with ``roles``."""
    return output_policy_input(request_input(roles), OBLIGATIONS, text, offset=offset, final=final)


def codes(decision: OutputDecision) -> list[str]:
    return [reason.code for reason in decision.reasons]


Opener = Callable[[Path, float], Awaitable[PolicyEngine]]


@pytest.fixture(params=["embedded", "opa"])
async def open_engine(request: pytest.FixtureRequest) -> AsyncIterator[Opener]:
    """Opens engines of one kind on a folder (OPA: the session's empty server, loaded by the gateway)."""
    opened: list[PolicyEngine] = []
    url = request.getfixturevalue("opa_server") if request.param == "opa" else None

    async def open_(folder: Path, timeout_s: float = TIMEOUT_S) -> PolicyEngine:
        if url is None:
            engine: PolicyEngine = EmbeddedPolicyEngine.load(folder, timeout_s)
        else:
            engine = await OpaPolicyEngine.connect(url, folder, timeout_s)
        opened.append(engine)
        return engine

    yield open_
    for engine in opened:
        await engine.aclose()


@pytest.fixture(params=["embedded", "opa"])
async def shipped(request: pytest.FixtureRequest) -> AsyncIterator[PolicyEngine]:
    """An engine on ``policies/``; on OPA as production serves it (OPA loaded the folder itself)."""
    if request.param == "embedded":
        engine: PolicyEngine = EmbeddedPolicyEngine.load(POLICY_DIR, TIMEOUT_S)
    else:
        engine = await OpaPolicyEngine.connect(request.getfixturevalue("opa_policy_server"), POLICY_DIR, TIMEOUT_S,
                                               load=False)
    try:
        yield engine
    finally:
        await engine.aclose()


def policy(tmp_path: Path, rego: str) -> Path:
    """A policy folder with a request decision that allows, a model list, and ``rego``."""
    return write_policy(tmp_path / "policy", f"decision := {ALLOW}\nvisible_models := set()\n{rego}")


# ---------------------------------------------------------------- the parser


def test_allowed_document_with_redactions_parsed() -> None:
    doc = {"allow": True, "reasons": [], "obligations": {"redact": [{"detector": "email", "text": "a@b.example"}],
                                                         "log_redact": [{"detector": "phone", "text": "555 0100"}]}}
    decision = OutputDecision.from_document(doc)
    assert decision == OutputDecision(True, (), (Redaction("email", "a@b.example"),),
                                      (Redaction("phone", "555 0100"),))
    assert decision.to_document() == doc
    # a policy written before log_redact: nothing more to mask in the log
    older = OutputDecision.from_document({**doc, "obligations": {"redact": doc["obligations"]["redact"]}})
    assert older.log_redact == () and older.to_document()["obligations"]["log_redact"] == []


def test_stop_document_parsed_and_redact_may_be_left_out() -> None:
    decision = OutputDecision.from_document(
        {"allow": False, "reasons": [{"code": "output_pii_detected", "message": "m"}], "obligations": {}})
    assert decision == OutputDecision(False, (Reason("output_pii_detected", "m"),), ())
    assert not decision.is_unavailable and not decision.is_policy_error


@pytest.mark.parametrize("doc, complaint", [
    ({"allow": True, "reasons": [{"code": "a", "message": "b"}], "obligations": {}}, "gives reasons"),
    ({"allow": False, "reasons": [], "obligations": {}}, "without a reason"),
    ({"allow": "yes", "reasons": [], "obligations": {}}, "must be a boolean"),
    ({"allow": True, "reasons": [], "obligations": {"stop": True}}, "unknown keys"),
    ({"allow": True, "reasons": [], "obligations": {"redact": [{"detector": "email"}]}},
     r"output_decision.obligations.redact\[0\] lacks"),
    ({"allow": True, "reasons": [], "obligations": {"redact": [{"detector": "email", "text": ""}]}}, "non-empty"),
    ({"allow": True, "reasons": [], "obligations": {"log_redact": [{"text": "a@b.example"}]}},
     r"output_decision.obligations.log_redact\[0\] lacks"),
    ({"allow": False, "reasons": [{"code": "", "message": "m"}], "obligations": {}},
     r"output_decision.reasons\[0\].code must be a non-empty string"),
    ({"allow": True, "reasons": []}, "lacks"),
    ([], "must be an object"),
])
def test_malformed_document_refused(doc: Any, complaint: str) -> None:
    with pytest.raises(MalformedDecision, match=complaint):
        OutputDecision.from_document(doc)


def test_unavailable_is_a_stop_marked_in_the_document() -> None:
    decision = OutputDecision.unavailable("no evaluator", retry_after_s=1)
    assert not decision.allow and decision.is_unavailable
    assert decision.to_document()["unavailable"] is True
    assert "unavailable" not in OutputDecision.fail_closed(POLICY_ERROR, "m").to_document()


# ---------------------------------------------------------------- the input


def test_input_keeps_the_request_context_and_not_the_prompt() -> None:
    request = request_input(["analyst"])
    obligations = {**OBLIGATIONS, "redact": [{"detector": "email", "text": "a@b.example"},
                                             {"detector": "email", "text": "c@d.example"}]}
    document = output_policy_input(request, obligations, "Ｏｎｅ\u200btwo", offset=12, final=False)
    assert document["principal"] == request["principal"] and document["model"] == request["model"]
    assert document["request"] == {"endpoint": "chat.completions", "model": "govgate-tiny", "purpose": None,
                                   "stream": False, "max_tokens": 100}
    assert document["decision"] == {"allow": True, "obligations": {**OBLIGATIONS, "redact": ["email"]}}
    assert document["output"] == {"text": "Ｏｎｅ\u200btwo", "normalized_text": "Onetwo", "offset": 12, "final": False}
    assert "a@b.example" not in repr(document) and "hello" not in repr(document)


def test_input_takes_the_decision_its_obligations_or_their_documents() -> None:
    request = request_input(["analyst"])
    decision = Decision(True, (), Obligations(max_tokens=100, prompt_logging="redacted", priority=5,
                                              redact=(Redaction("phone", "555 123 4567"),)))
    expected = {"max_tokens": 100, "prompt_logging": "redacted", "priority": 5, "redact": ["phone"]}
    for given in (decision, decision.obligations, decision.to_document(), decision.obligations.to_document()):
        document = output_policy_input(policy_input=request, decision=given, text="x", offset=0, final=True)
        assert document["decision"] == {"allow": True, "obligations": expected}
    assert output_policy_input(None, None, "x")["decision"] == {"allow": True, "obligations": {}}


def test_negative_offset_refused() -> None:
    with pytest.raises(ValueError):
        window("x", ["analyst"], offset=-1)


# ---------------------------------------------------------------- the engines


async def test_shipped_rules_stop_redact_and_allow(shipped: PolicyEngine) -> None:
    engine = shipped
    card = await engine.decide_output(window("pay with 4111 1111 1111 1111", ["analyst"]))
    ssn = await engine.decide_output(window("the ssn is 123-45-6789", ["analyst"]))
    admin_ssn = await engine.decide_output(window("the ssn is 123-45-6789", ["admin"]))
    plain = await engine.decide_output(window("nothing to see", ["analyst"]))
    assert not card.allow and codes(card) == ["output_pii_detected"]
    assert card.redact == (Redaction("payment_card", "4111 1111 1111 1111"),)
    assert "4111" not in card.reasons[0].message
    assert ssn == OutputDecision(True, (), (Redaction("us_ssn", "123-45-6789"),))
    assert admin_ssn == OutputDecision(True, (), ())
    assert plain == OutputDecision(True, (), ())


async def test_policy_without_output_rule_lets_outputs_through(open_engine: Opener, tmp_path: Path) -> None:
    engine = await open_engine(policy(tmp_path, ""))
    first = await engine.decide_output(window("4111 1111 1111 1111", ["analyst"]))
    second = await engine.decide_output(window("anything", []))
    assert first == second == OutputDecision.allowed()


async def test_output_rule_undefined_for_an_input_stops(open_engine: Opener, tmp_path: Path) -> None:
    allow = '{"allow": true, "reasons": [], "obligations": {}}'
    engine = await open_engine(policy(tmp_path, f"output_decision := {allow} if not input.output.final\n"))
    decision = await engine.decide_output(window("text", ["analyst"], final=True))
    assert codes(decision) == [POLICY_ERROR] and "no output decision" in decision.reasons[0].message
    assert (await engine.decide_output(window("text", ["analyst"], final=False))).allow


async def test_malformed_output_decision_stops(open_engine: Opener, tmp_path: Path) -> None:
    engine = await open_engine(policy(tmp_path, 'output_decision := {"allow": true}\n'))
    decision = await engine.decide_output(window("text", ["analyst"]))
    assert codes(decision) == [POLICY_ERROR] and "malformed output decision" in decision.reasons[0].message


async def test_policy_stop_passes_through(open_engine: Opener, tmp_path: Path) -> None:
    engine = await open_engine(policy(tmp_path, f"output_decision := {STOP}\n"))
    assert await engine.decide_output(window("text", [])) == OutputDecision(False, (Reason("x", "y"),), ())


async def test_slow_output_rule_is_unavailable_not_allowed(open_engine: Opener, tmp_path: Path) -> None:
    rego = f"""{SLOW}
output_decision := {{"allow": true, "reasons": [], "obligations": {{}}}} if {{
	input.output.text == "slow"
	slow_count > 0
}} else := {STOP}
"""
    engine = await open_engine(policy(tmp_path, rego), SHORT_TIMEOUT_S)
    slow = await engine.decide_output(window("slow", ["analyst"]))
    quick = await engine.decide_output(window("quick", ["analyst"]))
    assert codes(slow) == [POLICY_UNAVAILABLE] and slow.is_unavailable
    assert codes(quick) == ["x"]


async def test_reloading_engine_gives_the_deciding_revision(tmp_path: Path) -> None:
    folder = policy(tmp_path, f"output_decision := {STOP}\n")

    async def opener() -> PolicyEngine:
        return EmbeddedPolicyEngine.load(folder, TIMEOUT_S)

    reloading = ReloadingPolicyEngine(await opener(), opener, policy_dir=folder)
    try:
        first, first_revision = await reloading.decide_output_with_revision(window("text", []))
        write_policy(folder, f"decision := {ALLOW}\nvisible_models := set()\n")  # the output rule is gone
        assert (await reloading.reload()).changed
        second, second_revision = await reloading.decide_output_with_revision(window("text", []))
    finally:
        await reloading.aclose()
    assert codes(first) == ["x"] and second == OutputDecision.allowed()
    assert first_revision != second_revision == reloading.revision


async def test_emptied_opa_stops_outputs_rather_than_taking_them_for_unchecked(
        start_opa: Callable[..., Any], tmp_path: Path) -> None:
    """An OPA that lost its policy answers every rule undefined: not "a policy without output rules"."""
    folder = policy(tmp_path, "")  # no output rule: outputs would pass, were OPA holding this policy
    server = start_opa(folder)
    engine = await OpaPolicyEngine.connect(server.url, folder, TIMEOUT_S, load=False)
    try:
        async with OpaAddress.parse(server.url).client(TIMEOUT_S) as client:
            for policy_id in await client.get_policies_list():
                await client.delete_policy(policy_id)
        emptied = await engine.decide_output(window("text", ["analyst"]))
    finally:
        await engine.aclose()
    assert codes(emptied) == [POLICY_ERROR]


async def test_whether_a_revision_has_an_output_rule_is_known_on_both_engines(open_engine: Opener,
                                                                              tmp_path: Path) -> None:
    # One after the other: on OPA both engines load into the one server.
    without = await open_engine(policy(tmp_path / "without", ""))
    assert await without.has_output_rule() is False
    with_rule = await open_engine(policy(tmp_path / "with", f"output_decision := {STOP}\n"))
    assert await with_rule.has_output_rule() is True


async def test_the_reloader_says_a_rule_is_absent_only_for_the_revision_it_holds(tmp_path: Path) -> None:
    folder = policy(tmp_path, "")  # no output rule

    async def opener() -> PolicyEngine:
        return EmbeddedPolicyEngine.load(folder, TIMEOUT_S)

    reloading = ReloadingPolicyEngine(await opener(), opener, policy_dir=folder)
    try:
        first = reloading.revision
        assert await reloading.output_rule_absent(first) is True
        assert await reloading.output_rule_absent("another revision") is False  # admitted under another
        write_policy(folder, f"decision := {ALLOW}\nvisible_models := set()\noutput_decision := {STOP}\n")
        assert (await reloading.reload()).changed
        assert await reloading.output_rule_absent(first) is False
        assert await reloading.output_rule_absent(reloading.revision) is False
    finally:
        await reloading.aclose()
