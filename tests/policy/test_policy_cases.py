"""One table of decision cases, run through both engines: they must agree, and be right.

docs/architecture.md ("Why these parts") promises that the embedded engine (regorus) and an OPA server
return the same decisions for the same policy folder. Each case runs through
both, on the policy in ``policies/``; a case passes when the decision
documents are equal and match what the case expects. The embedded engine
runs twice: as the gateway runs it, on regorus's compiled VM
(:mod:`gateway.policy.vm`, its sampled checks against the interpreter off,
so that a difference shows here rather than being mended there), and on the
interpreter alone. For each well-formed request case, both engines' ``visible_models`` must hide the
model exactly when a reason says the principal may not use it (the gateway answers such a refusal as
an unknown model).

Cases live in ``tests/policy_cases/*.json`` (every file there is loaded),
each a JSON list of::

    {"name": "unique-name",
     "entry": "output_decision",           # optional: the rule judged, "decision" (the default)
                                           # or "output_decision" (input: an output window)
     "input": {...},                       # the policy input (any JSON)
     "data": {...},                        # optional: replaces data.govgate_config
     "expect": {"allow": true,
                "reason_codes": ["a", "b"], # the distinct reason codes, sorted
                "obligations": {...}}}      # optional: these keys must match exactly

For an output case ``obligations`` can only hold ``redact`` and ``log_redact``.
``reason_codes`` lists each code once: two reasons with one code (two
malformed fields, say) are one entry. Cases with the same ``data`` share a
policy folder (``policies/`` copied, ``govgate_config`` replaced), an
embedded engine and one push to OPA, so a file of many cases stays fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from gateway.policy import Decision, EmbeddedPolicyEngine, OpaPolicyEngine, OutputDecision
from gateway.policy.revision import canonical_json
from tests.opa_fixtures import POLICY_DIR, ROOT, OpaServer

CASE_DIR = ROOT / "tests" / "policy_cases"
TIMEOUT_S = 10.0
_CASE_KEYS = {"name", "input", "expect"}
_OPTIONAL_CASE_KEYS = {"data", "entry"}
#: The rules a case may judge (``entry``), and the engine method that asks each.
ENTRIES = {"decision": "decide", "output_decision": "decide_output"}
_EXPECT_KEYS = {"allow", "reason_codes"}
_OPTIONAL_EXPECT_KEYS = {"obligations"}


@dataclass(frozen=True)
class Case:
    file: str
    name: str
    input: Any
    data: dict[str, Any] | None
    expect: dict[str, Any]
    entry: str = "decision"

    @property
    def id(self) -> str:
        return f"{self.file}::{self.name}"

    @property
    def group(self) -> str:
        """Cases evaluated on the same data share an engine."""
        return "" if self.data is None else canonical_json(self.data).decode()


def load_cases(folder: Path) -> tuple[list[Case], list[str]]:
    """Every case in ``folder``, and the problems found in the files (reported by a test, not at collection)."""
    cases: list[Case] = []
    problems: list[str] = []
    names: set[str] = set()
    for path in sorted(folder.glob("*.json")):
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: not readable JSON: {exc}")
            continue
        if not isinstance(items, list):
            problems.append(f"{path.name}: must hold a JSON list of cases")
            continue
        for index, item in enumerate(items):
            where = f"{path.name}[{index}]"
            problem = _case_problem(item)
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            if item["name"] in names:
                problems.append(f"{where}: the name {item['name']!r} is used twice")
                continue
            names.add(item["name"])
            cases.append(Case(path.name, item["name"], item["input"], item.get("data"), item["expect"],
                              item.get("entry", "decision")))
    return cases, problems


def _case_problem(item: Any) -> str | None:
    if not isinstance(item, dict):
        return "a case must be an object"
    if missing := _CASE_KEYS - item.keys():
        return f"lacks {sorted(missing)}"
    if unknown := item.keys() - _CASE_KEYS - _OPTIONAL_CASE_KEYS:
        return f"unknown keys {sorted(unknown)}"
    if not isinstance(item["name"], str) or not item["name"]:
        return "name must be a non-empty string"
    if "entry" in item and item["entry"] not in ENTRIES:
        return f"entry must be one of {sorted(ENTRIES)}"
    if "data" in item and not isinstance(item["data"], dict):
        return "data must be an object (the whole govgate_config document)"
    expect = item["expect"]
    if not isinstance(expect, dict):
        return "expect must be an object"
    if missing := _EXPECT_KEYS - expect.keys():
        return f"expect lacks {sorted(missing)}"
    if unknown := expect.keys() - _EXPECT_KEYS - _OPTIONAL_EXPECT_KEYS:
        return f"expect has unknown keys {sorted(unknown)}"
    if not isinstance(expect["allow"], bool):
        return "expect.allow must be true or false"
    codes = expect["reason_codes"]
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
        return "expect.reason_codes must be a list of strings"
    if codes != sorted(set(codes)):
        return f"expect.reason_codes must be sorted and distinct: {sorted(set(codes))}"
    if not isinstance(expect.get("obligations", {}), dict):
        return "expect.obligations must be an object"
    if item.get("entry") == "output_decision" and expect.get("obligations", {}).keys() - {"redact", "log_redact"}:
        return "an output case's expect.obligations can only hold redact and log_redact"
    return None


CASES, PROBLEMS = load_cases(CASE_DIR)


@dataclass(frozen=True)
class Outcome:
    #: On the compiled VM, as the gateway decides.
    embedded: Decision | OutputDecision
    #: On regorus's interpreter alone (``vm="off"``).
    interpreted: Decision | OutputDecision
    #: None where no opa binary is available (the case is then checked on the embedded engine only).
    opa: Decision | OutputDecision | None
    #: Whether ``visible_models`` lists the case's model for its principal, per engine (``embedded``,
    #: ``opa``), as ``GET /v1/models`` and a refused completion ask it; empty for a case it does not apply to.
    visible: dict[str, bool] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class GroupRevisions:
    folder: str
    embedded: str
    opa: str


#: Per data group's folder, who answered on the embedded engine after all its cases (evaluator notes).
ANSWERED_BY: dict[str, list[str]] = {}


def policy_folder(target: Path, config: dict[str, Any] | None) -> Path:
    """``policies/`` copied to ``target``, with ``govgate_config`` replaced when ``config`` is given."""
    folder = Path(shutil.copytree(POLICY_DIR, target))
    if config is not None:
        data_file = folder / "data.json"
        data = json.loads(data_file.read_text(encoding="utf-8")) if data_file.exists() else {}
        data["govgate_config"] = config
        data_file.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return folder


async def evaluate_all(opa_url: str | None, workdir: Path) -> tuple[dict[str, Outcome], list[GroupRevisions]]:
    """Every case on both engines (OPA when ``opa_url``): one embedded engine and one OPA push per data group."""
    groups: dict[str, list[Case]] = defaultdict(list)
    for case in CASES:
        groups[case.group].append(case)
    outcomes: dict[str, Outcome] = {}
    revisions: list[GroupRevisions] = []
    opa: OpaPolicyEngine | None = None
    try:
        for index, cases in enumerate(groups.values()):
            folder = policy_folder(workdir / f"group-{index}", cases[0].data)
            embedded = await asyncio.to_thread(EmbeddedPolicyEngine.load, folder, TIMEOUT_S, vm_check_every=0)
            interpreter = await asyncio.to_thread(EmbeddedPolicyEngine.load, folder, TIMEOUT_S, vm="off")
            try:
                by_embedded = await asyncio.gather(*(ask(embedded, case) for case in cases))
                seen_embedded = await asyncio.gather(*(sees(embedded, case) for case in cases))
                by_interpreter = await asyncio.gather(*(ask(interpreter, case) for case in cases))
                ANSWERED_BY[folder.name] = embedded.answered_by
                by_opa: list[Decision | OutputDecision | None] = [None] * len(cases)
                seen_opa: list[bool | None] = [None] * len(cases)
                if opa_url is not None:
                    if opa is None:
                        opa = await OpaPolicyEngine.connect(opa_url, folder, TIMEOUT_S)
                    else:
                        await opa.reload(folder)
                    revisions.append(GroupRevisions(folder.name, embedded.revision, opa.revision))
                    by_opa = list(await asyncio.gather(*(ask(opa, case) for case in cases)))
                    seen_opa = list(await asyncio.gather(*(sees(opa, case) for case in cases)))
            finally:
                await embedded.aclose()
                await interpreter.aclose()
            for case, mine, interpreted, theirs, mine_seen, their_seen in zip(
                    cases, by_embedded, by_interpreter, by_opa, seen_embedded, seen_opa):
                visible = {name: seen for name, seen in (("embedded", mine_seen), ("opa", their_seen))
                           if seen is not None}
                outcomes[case.id] = Outcome(mine, interpreted, theirs, visible)
    finally:
        if opa is not None:
            await opa.aclose()
    return outcomes, revisions


async def ask(engine: EmbeddedPolicyEngine | OpaPolicyEngine, case: Case) -> Decision | OutputDecision:
    """The engine's answer to the rule the case judges."""
    return await getattr(engine, ENTRIES[case.entry])(case.input)


async def sees(engine: EmbeddedPolicyEngine | OpaPolicyEngine, case: Case) -> bool | None:
    """Whether ``visible_models`` lists a request case's model for its principal (None: no such case)."""
    principal, model = _visibility_input(case)
    if principal is None or model is None:
        return None
    return model["name"] in await engine.visible_models(principal, [model])


def _visibility_input(case: Case) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A request case's principal and model, when both are well formed (the others test malformed input)."""
    data = case.input if isinstance(case.input, dict) else {}
    principal, model = data.get("principal"), data.get("model")
    if case.entry != "decision" or "invalid_input" in case.expect["reason_codes"]:
        return None, None
    if not isinstance(principal, dict) or not isinstance(model, dict) or not isinstance(model.get("name"), str):
        return None, None
    return principal, model


@pytest.fixture(scope="module")
def evaluated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[tuple[dict[str, Outcome], list[GroupRevisions]]]:
    """All outcomes, computed once, on an OPA of this module's own that loaded ``policies/``.

    The gateway then uploads each group's folder over it: the same modules
    (OPA keeps them; see ``OpaPolicyEngine``) and that group's data. Without
    an opa binary (and not required to have one) the cases still run on the
    embedded engine; ``test_cases_ran_on_opa`` then skips and says why.
    """
    try:
        binary: Path | None = request.getfixturevalue("opa_binary")
    except pytest.skip.Exception:
        binary = None
    server = None
    if binary is not None:
        server = OpaServer(binary, request.getfixturevalue("opa_log_dir"), POLICY_DIR).start()
    try:
        yield asyncio.run(evaluate_all(server.url if server else None, tmp_path_factory.mktemp("policy-cases")))
    finally:
        if server is not None:
            server.stop()


def test_case_files_are_well_formed() -> None:
    assert not PROBLEMS, "\n".join(PROBLEMS)
    assert CASES, f"no cases in {CASE_DIR}"


def test_cases_ran_on_opa(opa_binary: Path) -> None:
    """Skips (fails in CI) where there is no opa binary: the table then ran on one engine only."""


def test_the_embedded_engine_answered_every_case_on_the_compiled_vm(evaluated: Any) -> None:
    """The shipped policy compiles for regorus's VM and the VM agreed with the interpreter on every answer
    it checked (the first ones of each evaluator): an evaluator whose VM is off says why."""
    assert ANSWERED_BY and all(ANSWERED_BY.values())
    off = {folder: notes for folder, notes in ANSWERED_BY.items()
           if not all(note.startswith("compiled VM") for note in notes)}
    assert off == {}


def test_both_engines_load_the_same_revision_for_each_data(evaluated: Any) -> None:
    _, revisions = evaluated
    assert [r for r in revisions if r.embedded != r.opa] == []


def mismatches(decision: Decision | OutputDecision, expect: dict[str, Any]) -> list[str]:
    """How ``decision`` differs from what a case expects (empty when it matches)."""
    found = []
    if decision.allow != expect["allow"]:
        found.append(f"allow is {decision.allow}, expected {expect['allow']}")
    codes = sorted({reason.code for reason in decision.reasons})
    if codes != expect["reason_codes"]:
        found.append(f"reason codes are {codes}, expected {expect['reason_codes']}")
    obligations = decision.to_document()["obligations"]
    for key, value in expect.get("obligations", {}).items():
        if key not in obligations:
            found.append(f"obligation {key} is missing, expected {value!r}")
        elif obligations[key] != value or isinstance(obligations[key], bool) != isinstance(value, bool):
            found.append(f"obligation {key} is {obligations[key]!r}, expected {value!r}")
    return found


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_case(case: Case, evaluated: Any) -> None:
    outcome: Outcome = evaluated[0][case.id]
    embedded = outcome.embedded.to_document()
    opa = outcome.opa.to_document() if outcome.opa is not None else None
    problems = [f"embedded: {m}" for m in mismatches(outcome.embedded, case.expect)]
    interpreted = outcome.interpreted.to_document()
    if interpreted != embedded:
        problems.append(f"the compiled VM and the interpreter disagree; interpreter: {json.dumps(interpreted)}")
    if outcome.opa is not None:
        problems += [f"opa: {m}" for m in mismatches(outcome.opa, case.expect)]
        if embedded != opa:
            problems.append("the engines disagree")
    assert not problems, (
        "\n".join(problems)
        + f"\nembedded decision: {json.dumps(embedded)}\nOPA decision:      {json.dumps(opa)}"
    )


#: The reasons that say the principal may not see the model (``policies/access.rego``): a request denied with
#: one is answered as an unknown model (``gateway/requests/hidden_models.py``), decided by ``visible_models``.
HIDING_CODES = frozenset({"unknown_role", "model_not_allowed", "team_model_not_allowed"})


#: The well-formed request cases (the others test malformed input or the output rules).
REQUEST_CASES = [case for case in CASES if _visibility_input(case)[0] is not None]


@pytest.mark.parametrize("case", REQUEST_CASES, ids=[case.id for case in REQUEST_CASES])
def test_visible_models_hides_exactly_what_the_access_reasons_deny(case: Case, evaluated: Any) -> None:
    """The gateway answers a refused request 404 when ``visible_models`` leaves its model out, and the audit
    shows the decision's reasons: on both engines, a model is hidden exactly when a reason says the principal
    may not use it, so the reviewer's reasons always explain the 404, and a 403 never names a hidden model."""
    outcome: Outcome = evaluated[0][case.id]
    assert outcome.visible.keys() >= {"embedded"}
    hidden_by_reasons = bool(HIDING_CODES & set(case.expect["reason_codes"]))
    assert outcome.visible == {engine: not hidden_by_reasons for engine in outcome.visible}, case.expect
