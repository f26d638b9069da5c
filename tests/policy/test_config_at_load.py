"""The policy's data is checked once, when a policy is loaded, and never on a decision.

``data.govgate.config_problems`` (policies/checks.rego) depends on the data
alone; the embedded evaluators and the OPA engine evaluate it at load and
refuse a policy whose data has problems, naming them (gateway/policy/
config_check.py). A reload with such data keeps the running policy. The
decision rules do not evaluate the check, so broken data cannot show up as
a ``config_error`` reason of a decision any more.
"""

from __future__ import annotations

import dataclasses

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from gateway.policy import EmbeddedPolicyEngine, OpaPolicyEngine, PolicyLoadError
from gateway.policy.config_check import CONFIG_PROBLEMS_RULE, config_refusal
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.policy.unittests import build_engine
from tests.opa_fixtures import POLICY_DIR, OpaServer

pytestmark = pytest.mark.anyio

TIMEOUT_S = 5.0


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to ``govgate_config`` that sets the dotted ``path`` to ``value``."""
    *parents, leaf = path.split(".")

    def change(config: dict[str, Any]) -> None:
        for key in parents:
            config = config.setdefault(key, {})
        config[leaf] = value

    return change


#: Broken data, and the problem the load must name.
BROKEN = {
    "invalid blocked pattern": (
        _set("content.blocked_patterns", [{"id": "bad", "pattern": "[a-"}]),
        "govgate_config.content.blocked_patterns[0] needs a string id and a usable pattern"),
    "Unicode-dependent class": (
        _set("content.blocked_patterns", [{"id": "digits", "pattern": r"\d{6}"}]),
        "govgate_config.content.blocked_patterns[0] needs a string id and a usable pattern"),
    "unknown detector action": (
        _set("content.detectors.email.action", "mask"),
        'govgate_config.content.detectors.email.action must be "deny" or "redact"'),
    # probe q3 F6: passed the check, then the trial refused it at start and reload, far from the data
    "role cap of 0 under clamp": (
        _set("roles.suspended", {"models": ["*"], "max_tokens": 0}),
        'govgate_config.roles.suspended.max_tokens is 0 with max_tokens_mode "clamp": every request would be '
        'allowed 0 tokens; to suspend the role use "models": [] or max_tokens_mode "deny"'),
    "malformed hours window": (
        _set("models.govgate-tiny.hours_utc", [9, 30]),
        "govgate_config.models.govgate-tiny.hours_utc must be [start, end] in whole hours from 0 to 24"),
    "limit that is not a number": (
        _set("limits.principals.default.in_flight", "8"),
        "govgate_config.limits.principals.default.in_flight must be a whole number >= 0 or null"),
    "misspelled limits section": (
        _set("limits.principal", {"default": {"in_flight": 1}}),
        "govgate_config.limits has an unknown key principal (known: principals, teams)"),
    "misspelled team share": (
        _set("teams.support.shares", 5),
        "govgate_config.teams.support has an unknown setting shares (known: models, share)"),
    "team entry that is not an object": (
        _set("teams.support", ["govgate-tiny"]),
        "govgate_config.teams.support must be an object or null"),
    "team share of zero": (
        _set("teams.support.share", 0),
        "govgate_config.teams.support.share must be a number from 0.001 to 1000, or null"),
    "absurd team share": (
        _set("teams.default", {"share": 5000}),
        "govgate_config.teams.default.share must be a number from 0.001 to 1000, or null"),
    "setting of a role nobody holds": (
        _set("roles.viewer.priority", 12),
        "govgate_config.roles.viewer.priority must be a whole number from 0 to 9"),
    "unknown output action": (
        _set("content.output.detectors.payment_card", {"action": "deny"}),
        'govgate_config.content.output.detectors.payment_card must be {"action": "allow", "redact" or "stop"}'),
    "output rule for no detector": (
        _set("content.output.roles.admin", {"passport": "allow"}),
        "govgate_config.content.output.roles.admin.passport names no detector"),
    "principal limits that are a list": (
        _set("limits.principals", [{"requests_per_minute": 1}]),
        "govgate_config.limits.principals must be an object or null"),
    "roles that are a list": (
        _set("roles", ["analyst"]),
        "govgate_config.roles must be an object or null"),
    "masking a blocked pattern's match": (
        _set("content.output.detectors.private_key", {"action": "redact"}),
        "govgate_config.content.output.detectors.private_key: a blocked pattern's action is \"allow\" or \"stop\""),
}


def broken_policy(target: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """``policies/`` copied to ``target`` with ``change`` applied to its ``govgate_config``."""
    folder = Path(shutil.copytree(POLICY_DIR, target))
    break_data(folder, change)
    return folder


def break_data(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data_file = folder / "data.json"
    document = json.loads(data_file.read_text(encoding="utf-8"))
    change(document["govgate_config"])
    data_file.write_text(json.dumps(document, indent=2), encoding="utf-8")


def test_refusal_names_every_problem_and_passes_usable_data() -> None:
    assert config_refusal([]) is None
    assert config_refusal(None) is None  # a policy without the check
    refusal = config_refusal(["b is wrong", "a is wrong"])
    assert refusal == "config_error: the policy's data is unusable: a is wrong; b is wrong"
    assert "and 5 more" in config_refusal([f"p{i:02}" for i in range(25)])
    assert "not a set of messages" in config_refusal({"a": 1})
    assert "not a set of messages" in config_refusal([1])


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_embedded_engine_refuses_broken_data_at_load(name: str, tmp_path: Path) -> None:
    change, problem = BROKEN[name]
    folder = broken_policy(tmp_path / "policy", change)
    with pytest.raises(PolicyLoadError) as refused:
        EmbeddedPolicyEngine.load(folder, TIMEOUT_S)
    assert "config_error" in str(refused.value) and problem in str(refused.value)


def test_embedded_engine_refuses_a_policy_without_its_data(tmp_path: Path) -> None:
    """No data.json (removed, or mid-replace) would make every role unknown and lift every limit."""
    folder = Path(shutil.copytree(POLICY_DIR, tmp_path / "policy"))
    (folder / "data.json").unlink()
    with pytest.raises(PolicyLoadError, match="config_error: .*govgate_config is missing"):
        EmbeddedPolicyEngine.load(folder, TIMEOUT_S)


async def test_reload_with_broken_data_keeps_the_running_policy(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(POLICY_DIR, tmp_path / "policy"))
    engine = EmbeddedPolicyEngine.load(folder, TIMEOUT_S)
    reloading = ReloadingPolicyEngine(engine, lambda: _open(folder), policy_dir=folder)
    try:
        change, problem = BROKEN["limit that is not a number"]
        break_data(folder, change)
        result = await reloading.reload()
        assert not result.changed and result.revision == engine.revision
        assert result.error is not None and problem in result.error
        assert reloading.current is engine
    finally:
        await reloading.aclose()


async def _open(folder: Path) -> EmbeddedPolicyEngine:
    return await asyncio.to_thread(EmbeddedPolicyEngine.load, folder, TIMEOUT_S)


def test_a_decision_does_not_evaluate_the_data_check(tmp_path: Path) -> None:
    """On data the load would refuse, the check finds the problem but a decision does not report it."""
    change, problem = BROKEN["setting of a role nobody holds"]
    folder = broken_policy(tmp_path / "policy", change)
    engine = build_engine(folder)
    engine.set_input_json("{}")
    assert problem in json.loads(engine.eval_rule_as_json(CONFIG_PROBLEMS_RULE))
    engine.set_input_json(json.dumps({"principal": {"id": "u", "roles": ["viewer"]}}))
    codes = {reason["code"] for reason in json.loads(engine.eval_rule_as_json("data.govgate.decision"))["reasons"]}
    assert "model_not_allowed" in codes and "config_error" not in codes


def test_the_shipped_data_passes_the_check() -> None:
    engine = build_engine(POLICY_DIR)
    engine.set_input_json("{}")
    assert json.loads(engine.eval_rule_as_json(CONFIG_PROBLEMS_RULE)) == []


@pytest.mark.parametrize("name", ["malformed hours window", "unknown output action", "masking a blocked pattern's match"])
async def test_opa_engine_refuses_broken_data_at_connect(start_opa: Callable[..., OpaServer], tmp_path: Path,
                                                         name: str) -> None:
    change, problem = BROKEN[name]
    folder = broken_policy(tmp_path / "policy", change)
    server = start_opa(folder)
    with pytest.raises(PolicyLoadError) as refused:
        await OpaPolicyEngine.connect(server.url, folder, TIMEOUT_S, load=False)
    assert "config_error" in str(refused.value) and problem in str(refused.value)


async def test_opa_reload_with_broken_data_puts_the_old_policy_back(start_opa: Callable[..., OpaServer],
                                                                    tmp_path: Path) -> None:
    folder = Path(shutil.copytree(POLICY_DIR, tmp_path / "policy"))
    server = start_opa(folder)
    engine = await OpaPolicyEngine.connect(server.url, folder, TIMEOUT_S, load=True)
    try:
        before = engine.revision
        change, problem = BROKEN["unknown detector action"]
        broken = broken_policy(tmp_path / "broken", change)
        with pytest.raises(PolicyLoadError, match="config_error") as refused:
            await engine.reload(broken)
        assert problem in str(refused.value)
        assert engine.revision == before and await engine.remote_revision() == before
    finally:
        await engine.aclose()


async def test_a_refused_revision_is_not_tried_again_at_every_poll(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow or broken module would otherwise start an evaluator (and log the refusal) at every poll;
    the same files are tried again after a backoff, a change or a SIGHUP (forced) at once."""
    from gateway.policy import reloader

    folder = Path(shutil.copytree(POLICY_DIR, tmp_path / "policy"))
    engine = EmbeddedPolicyEngine.load(folder, TIMEOUT_S)
    opened: list[int] = []

    async def counting_open() -> EmbeddedPolicyEngine:
        opened.append(1)
        return await _open(folder)

    now = [1000.0]
    monkeypatch.setattr(reloader.time, "monotonic", lambda: now[0])
    reloading = ReloadingPolicyEngine(engine, counting_open, policy_dir=folder)
    try:
        change, problem = BROKEN["limit that is not a number"]
        break_data(folder, change)
        for _ in range(5):  # five polls within the backoff: one attempt
            result = await reloading.reload()
            assert not result.changed and result.error is not None and problem in result.error
        assert len(opened) == 1
        now[0] += reloader.REJECTED_RETRY_S + 0.1  # the backoff is over: tried again, then waits twice as long
        await reloading.reload()
        assert len(opened) == 2
        now[0] += reloader.REJECTED_RETRY_S + 0.1
        await reloading.reload()
        assert len(opened) == 2
        await reloading.reload(force=True)  # SIGHUP: at once
        assert len(opened) == 3
        shutil.copy(POLICY_DIR / "data.json", folder / "data.json")  # put back: the running revision again
        result = await reloading.reload()
        assert len(opened) == 3 and result.error is None and reloading.current is engine
        (folder / "extra.rego").write_text("package govgate_extra\n\nanswer := 42\n")  # another, valid change
        result = await reloading.reload()  # a new revision: tried at once, and taken
        assert len(opened) == 4 and result.changed and result.error is None and reloading.current is not engine
    finally:
        await reloading.aclose()


async def test_an_unreadable_folder_is_logged_with_the_same_backoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A data.json that is not JSON logged an ERROR at every poll (every 2 s, indefinitely: h10 F9); the
    same unreadable files are reported again after the refused-revision backoff, a change or a SIGHUP at once."""
    from gateway.policy import reloader

    folder = Path(shutil.copytree(POLICY_DIR, tmp_path / "policy"))
    engine = EmbeddedPolicyEngine.load(folder, TIMEOUT_S)
    now = [1000.0]
    monkeypatch.setattr(reloader.time, "monotonic", lambda: now[0])
    reloading = ReloadingPolicyEngine(engine, lambda: _open(folder), policy_dir=folder)

    def errors_logged() -> int:
        return sum(1 for r in caplog.records if r.levelno >= logging.ERROR and "unreadable" in r.getMessage())

    caplog.set_level(logging.DEBUG, logger="govgate.policy")
    try:
        (folder / "data.json").write_text('{"govgate_config": {', encoding="utf-8")
        for _ in range(5):  # five polls within the backoff: one ERROR
            result = await reloading.poll()
            assert not result.changed and result.error is not None and "not valid JSON" in result.error
        assert errors_logged() == 1 and reloading.current is engine
        now[0] += reloader.REJECTED_RETRY_S + 0.1  # the backoff is over: reported again, then twice as late
        await reloading.poll()
        assert errors_logged() == 2
        now[0] += reloader.REJECTED_RETRY_S + 0.1
        await reloading.poll()
        assert errors_logged() == 2
        await reloading.reload(force=True)  # SIGHUP: at once
        assert errors_logged() == 3
        (folder / "data.json").write_text("[1, 2", encoding="utf-8")  # broken otherwise: reported at once
        result = await reloading.poll()
        assert errors_logged() == 4 and result.error is not None
        shutil.copy(POLICY_DIR / "data.json", folder / "data.json")  # repaired: the running revision again
        result = await reloading.poll()
        assert result.error is None and reloading.current is engine
        (folder / "data.json").write_text('{"govgate_config": {', encoding="utf-8")  # broken anew: at once
        await reloading.poll()
        assert errors_logged() == 5
    finally:
        await reloading.aclose()


async def test_a_revision_that_fails_on_real_requests_does_not_replace_the_running_one(tmp_path: Path) -> None:
    """Rules that conflict only for a real request (never for the empty input the evaluators start on) passed
    the load and answered policy_error to every request for that model: the reload now tries the new
    revision on a request per role and model first, and keeps the running one."""
    from gateway.requests.policy_trial import policy_trial
    from workers.contract.registry import TINY_MODEL_NAME, load_registry

    folder = Path(shutil.copytree(POLICY_DIR, tmp_path / "policy"))
    engine = EmbeddedPolicyEngine.load(folder, TIMEOUT_S)
    registry = load_registry(None, tmp_path / "var")
    reloading = ReloadingPolicyEngine(engine, lambda: _open(folder), policy_dir=folder, trial=policy_trial(registry))
    try:
        (folder / "conflict.rego").write_text(
            "package govgate\n\n"
            f'decision := {{"allow": true, "reasons": []}} if input.request.model == "{TINY_MODEL_NAME}"\n')
        result = await reloading.reload()
        assert not result.changed and reloading.current is engine
        assert result.error is not None and "the policy fails on a request of role" in result.error
        assert f"model '{TINY_MODEL_NAME}'" in result.error
        (folder / "conflict.rego").write_text("package govgate_extra\n\nanswer := 42\n")  # harmless: taken
        result = await reloading.reload()
        assert result.changed and result.error is None and reloading.current is not engine
    finally:
        await reloading.aclose()


async def _trial_reload(tmp_path: Path, edit: Callable[[Path], None]) -> tuple[Any, ReloadingPolicyEngine, Any]:
    """A reloading engine on a copy of ``policies/`` with the gateway's trial, after ``edit`` and a reload."""
    from gateway.requests.policy_trial import policy_trial
    from workers.contract.registry import load_registry

    folder = Path(shutil.copytree(POLICY_DIR, tmp_path / "policy"))
    engine = EmbeddedPolicyEngine.load(folder, TIMEOUT_S)
    registry = load_registry(None, tmp_path / "var")
    reloading = ReloadingPolicyEngine(engine, lambda: _open(folder), policy_dir=folder, trial=policy_trial(registry))
    edit(folder)
    return await reloading.reload(), reloading, engine


async def test_a_revision_that_fails_for_every_principal_with_a_team_is_refused(tmp_path: Path) -> None:
    """The trial principal had no team: rules that conflict for every member of a team were loaded, and
    every such request got 403 policy_error (h10 F5a). The trial now asks for each team the data names."""
    def conflict_for_teams(folder: Path) -> None:
        (folder / "conflict.rego").write_text(
            'package govgate\n\ndecision := {"allow": true, "reasons": []} if is_string(input.principal.team)\n')

    result, reloading, engine = await _trial_reload(tmp_path, conflict_for_teams)
    try:
        assert not result.changed and reloading.current is engine
        assert result.error is not None and "the policy fails on a request of role" in result.error
        assert "team 'research'" in result.error or "team 'support'" in result.error
    finally:
        await reloading.aclose()


async def test_a_revision_that_allows_with_max_tokens_0_is_refused(tmp_path: Path) -> None:
    """The gateway refuses an allow with max_tokens 0 (policy_error) itself; the trial did not apply that
    check, so such a policy loaded and every allowed request got 403 (h10 F5b)."""
    def zero_max_tokens(folder: Path) -> None:
        module = folder / "govgate.rego"
        text = module.read_text(encoding="utf-8")
        assert '\t"max_tokens": granted_max_tokens,' in text
        module.write_text(text.replace('\t"max_tokens": granted_max_tokens,', '\t"max_tokens": 0,', 1),
                          encoding="utf-8")

    result, reloading, engine = await _trial_reload(tmp_path, zero_max_tokens)
    try:
        assert not result.changed and reloading.current is engine
        assert result.error is not None and "max_tokens 0" in result.error
    finally:
        await reloading.aclose()


async def test_a_revision_whose_output_rule_fails_on_every_output_is_refused(tmp_path: Path) -> None:
    """The trial never asked output_decision: an output rule that errs on every output was loaded, and every
    completion was stopped (h10 F5c). Now each role and model is tried on a representative output too."""
    def conflicting_output_rule(folder: Path) -> None:
        (folder / "conflict.rego").write_text(
            'package govgate\n\noutput_decision := {"allow": true, "reasons": [], "obligations": {}} '
            "if input.output.final\n")

    result, reloading, engine = await _trial_reload(tmp_path, conflicting_output_rule)
    try:
        assert not result.changed and reloading.current is engine
        assert result.error is not None and "the policy fails on an output of role" in result.error
    finally:
        await reloading.aclose()


async def test_a_revision_whose_model_list_fails_is_refused(tmp_path: Path) -> None:
    """A visible_models rule that errs for a team's members passed every request trial (a request's model is
    judged by the decision) and then answered GET /v1/models with 403 policy_error for all of them."""
    def failing_list(folder: Path) -> None:
        (folder / "errs.rego").write_text(
            "package govgate\n\nimport rego.v1\n\nvisible_models contains name if {\n"
            "\tis_string(input.principal.team)\n\tname = sprintf(\"%v\", [10 / count([])])\n}\n",
            encoding="utf-8")

    result, reloading, engine = await _trial_reload(tmp_path, failing_list)
    try:
        assert not result.changed and reloading.current is engine
        assert result.error is not None and "the policy fails listing the models of role" in result.error
        assert "team '" in result.error
    finally:
        await reloading.aclose()


def test_the_trial_tries_every_role_and_team_on_every_model_in_every_shape_within_its_bound(tmp_path: Path) -> None:
    from gateway.requests.policy_trial import MAX_TRIALS, TRIAL_TEAM, trial_inputs
    from gateway.requests.trial_shapes import REQUEST_SHAPES
    from workers.contract.registry import load_registry

    registry = load_registry(None, tmp_path / "var")
    models = registry.names()
    config = {"roles": {f"r{i}": {} for i in range(3)}, "teams": {f"t{i}": {} for i in range(5)} | {"default": {}},
              "limits": {"teams": {"t9": {}, "default": {}}}}
    trials = trial_inputs(registry, {"govgate_config": config})
    inputs = [trial.document for trial in trials]
    seen = {(d["principal"]["roles"][0], d["principal"]["team"], d["model"]["name"]) for d in inputs}
    assert len(seen) <= MAX_TRIALS
    # "default" is the convention, not a team; the made-up team is always asked (keys may name any team)
    teams = {None, *(f"t{i}" for i in range(5)), "t9", TRIAL_TEAM}
    for model in models:
        assert {role for role, _, m in seen if m == model} == {f"r{i}" for i in range(3)}
        assert {team for _, team, m in seen if m == model} == teams
    shapes = {(d["request"]["endpoint"], d["request"]["stream"], d["request"]["max_tokens"] > 16) for d in inputs}
    assert shapes == {("chat.completions", False, False), ("chat.completions", True, False),
                      ("completions", False, False), ("chat.completions", False, True)}
    assert len(inputs) == len(seen) * len(REQUEST_SHAPES)  # every combination in every shape
    assert all("prompt" in d["request"] for d in inputs if d["request"]["endpoint"] == "completions")
    with_team = [d for d in inputs if d["principal"]["team"] is not None]
    assert all(d["usage"]["team"] is not None for d in with_team)
    many = {"roles": {f"r{i}": {} for i in range(40)}, "teams": {f"t{i}": {} for i in range(40)}}
    assert len(trial_inputs(registry, {"govgate_config": many})) == MAX_TRIALS * len(REQUEST_SHAPES)


def test_the_trial_asks_every_role_and_model_when_the_cap_cuts_and_a_team_the_data_does_not_name(
        tmp_path: Path) -> None:
    """Probe q3 F1, F2: the made-up team was asked only when the data named no team, so a rule failing for
    the teams keys name outside the data loaded; and with the models innermost, 8 roles on 10 models spent
    the cap on the first roles, two never asked. Every role, team and model now comes before any repeat."""
    from gateway.requests.policy_trial import MAX_TRIALS, TRIAL_TEAM, trial_inputs
    from workers.contract.registry import Registry, load_registry

    shipped = load_registry(None, tmp_path / "var")
    base = shipped.get(shipped.names()[0])
    specs = [dataclasses.replace(base, name=f"m{i}") for i in range(10)]
    registry = Registry({spec.name: spec for spec in specs})
    config = {"roles": {f"r{i}": {} for i in range(8)}, "teams": {"research": {}, "support": {}}}
    seen = {(d["principal"]["roles"][0], d["principal"]["team"], d["model"]["name"])
            for d in (trial.document for trial in trial_inputs(registry, {"govgate_config": config}))}
    assert len(seen) == MAX_TRIALS
    assert {role for role, _, _ in seen} == {f"r{i}" for i in range(8)}
    assert {model for _, _, model in seen} == {f"m{i}" for i in range(10)}
    assert {team for _, team, _ in seen} == {None, "research", "support", TRIAL_TEAM}


def _module(name: str, body: str) -> Callable[[Path], None]:
    """An edit adding ``body`` as a module of package govgate (the shipped modules kept)."""
    def edit(folder: Path) -> None:
        (folder / name).write_text(f"package govgate\n\nimport rego.v1\n\n{body}\n", encoding="utf-8")
    return edit


def _zero_max_tokens_above_16(folder: Path) -> None:
    """Allow with max_tokens 0 only when the request asks for more than the trial's 16 tokens."""
    module = folder / "govgate.rego"
    text = module.read_text(encoding="utf-8")
    assert '\t"max_tokens": granted_max_tokens,' in text
    module.write_text(text.replace('\t"max_tokens": granted_max_tokens,',
                                   '\t"max_tokens": granted_max_tokens * trial_cap,', 1), encoding="utf-8")
    _module("cap.rego", "default trial_cap := 1\n\ntrial_cap := 0 if input.request.max_tokens > 16")(folder)


#: Revisions that passed the trial and then failed live requests (probe p3 F6): what each needs, and a part of
#: the refusal naming where it failed.
_P3_GAPS = {
    # (a) output trials were one per (role, model), paired with one team: the analyst's was research
    "output for one role's team": (_module("trial.rego", 'output_stops contains {"code": "x", "message": "y"} if '
                                          '{ "analyst" in input.principal.roles; '
                                          'input.principal.team == "support"; 1 / 0 == 1 }'),
                                   "on an output of role 'analyst', team 'support'"),
    # (b) the trial asked stream: false only
    "stream": (_module("trial.rego", "t := 1 if input.request.stream == true\nt := 2 if input.request.stream == true\n"
                                     'content_denials contains {"code": "x", "message": "y"} if t == 9'),
               "(/v1/chat/completions, stream: true, max_tokens 16)"),
    # (c) the trial asked /v1/chat/completions only
    "completions": (_module("trial.rego", 't := 1 if input.request.endpoint == "completions"\n'
                                          't := 2 if input.request.endpoint == "completions"\n'
                                          'content_denials contains {"code": "x", "message": "y"} if t == 9'),
                    "(/v1/completions, stream: false, max_tokens 16)"),
    # (d) the output trial judged one final window only
    "non-final window": (_module("trial.rego", 'output_stops contains {"code": "x", "message": "y"} if '
                                               "{ input.output.final == false; 1 / 0 == 1 }"),
                         "stream: true, max_tokens 16, a non-final window at offset 0)"),
    # (e) the trial asked max_tokens 16 only
    "max_tokens above 16": (_zero_max_tokens_above_16, "max_tokens 0"),
}


@pytest.mark.parametrize("name", sorted(_P3_GAPS))
async def test_a_revision_failing_only_on_a_shape_the_trial_did_not_try_is_refused(tmp_path: Path, name: str) -> None:
    """Each of these revisions passed the trial and then answered policy_error to the live requests (or outputs)
    of its shape (probe p3 F6): the trial now asks each role and team in every shape a request takes."""
    edit, where = _P3_GAPS[name]
    result, reloading, engine = await _trial_reload(tmp_path, edit)
    try:
        assert not result.changed and reloading.current is engine, result
        assert result.error is not None and where in result.error, result.error
    finally:
        await reloading.aclose()


def test_a_trial_cut_by_its_cap_says_so_and_names_what_it_never_asked(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Probe q3 F2: the 64-combination cap cut the trial without a word. A cut now logs a warning with the
    counts and the roles, teams or models no asked combination held (here 70 roles: 6 never asked)."""
    from gateway.requests.policy_trial import MAX_TRIALS, trial_inputs
    from workers.contract.registry import Registry, load_registry

    shipped = load_registry(None, tmp_path / "var")
    base = shipped.get(shipped.names()[0])
    registry = Registry({base.name: base})
    config = {"roles": {f"r{i:02d}": {} for i in range(MAX_TRIALS + 6)}}
    with caplog.at_level(logging.WARNING, logger="gateway.requests.policy_trial"):
        trial_inputs(registry, {"govgate_config": config})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"request trials cut at {MAX_TRIALS} of " in warnings[0]
    assert "never asked: roles 'r64', 'r65', 'r66', 'r67', 'r68', 'r69'" in warnings[0], warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.requests.policy_trial"):
        trial_inputs(registry, {"govgate_config": {"roles": {"r": {}}}})  # 3 combinations: nothing cut
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.requests.policy_trial"):  # cut, but every role asked
        trial_inputs(registry, {"govgate_config": {"roles": {f"r{i:02d}": {} for i in range(MAX_TRIALS - 4)}}})
    cut = [r for r in caplog.records if "trials cut" in r.getMessage()]
    assert cut and all(r.levelno == logging.INFO for r in cut), [(r.levelname, r.getMessage()) for r in cut]
    assert "every role, team and model was asked" in cut[0].getMessage()


async def test_a_revision_failing_only_for_a_team_the_data_does_not_name_is_refused(tmp_path: Path) -> None:
    """Probe q3 F1: on data naming teams the made-up team was never asked, so rules conflicting only for a
    key's team outside the data (any ``keys create --team``) loaded and answered policy_error to its members."""
    from gateway.requests.policy_trial import TRIAL_TEAM

    edit = _module("unknown_team.rego",
                   'team_class := "restricted" if { is_string(input.principal.team); '
                   "not data.govgate_config.teams[input.principal.team] }\n"
                   'team_class := "open" if { is_string(input.principal.team); '
                   "not data.govgate_config.teams[input.principal.team].models }\n"
                   'content_denials contains {"code": "x", "message": "y"} if team_class == "nope"')
    result, reloading, engine = await _trial_reload(tmp_path, edit)
    try:
        assert not result.changed and reloading.current is engine, result
        assert result.error is not None and f"team '{TRIAL_TEAM}'" in result.error, result.error
    finally:
        await reloading.aclose()
