"""A new policy revision is tried on requests shaped like real ones before it replaces a working one.

Loading checks the modules compile, the entry points exist and the data is
usable (``config_problems``); the evaluators' start also evaluates the
decision once on an empty input. A module whose rules conflict, or that
fails, only for real inputs (``decision`` defined twice when
``input.request.model`` is one of the models; a builtin given a field of
the wrong type) passed all of that and then answered ``policy_error`` to
every such request: a working policy replaced by one that refuses everyone.

So a reload first asks the new engine for decisions on requests shaped like
real ones (a chat request saying "hello", no usage yet): every role the new
data names, on every model the registry serves, for a principal without a
team and for each team the data names (``teams`` and ``limits.teams``; a
made-up team when it names none), up to :data:`MAX_TRIALS` of them. Each
decision goes through the gateway's own checks (:func:`checked_decision`,
the admission path's: an allow with ``max_tokens`` 0 is a ``policy_error``
there too). Then the output rule is asked about a representative output
for each role and model (up to :data:`MAX_OUTPUT_TRIALS`). The revision is
refused, keeping the running one, when any answer is a ``policy_error``,
or when listing the models a role and team may use (``visible_models``,
as ``GET /v1/models`` asks; up to :data:`MAX_LIST_TRIALS`) fails.
These three gaps (no team, the gateway's own checks, no output trial) each
let a policy through that broke every real request (probe h10 F5).

A denial is an answer; so is "unavailable" (capacity, a slow OPA), which
says nothing about the policy and must not block a reload.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Iterator

from gateway.auth import Principal
from gateway.policy import POLICY_ERROR, Obligations, PolicyUnavailable
from gateway.requests.decision_checks import checked_decision
from gateway.requests.output_input import output_policy_input
from gateway.requests.policy_input import build_input
from workers.contract.registry import Registry

#: The most request decisions a reload asks for.
MAX_TRIALS = 64
#: The most output decisions a reload asks for (one per role and model, in the request trials' order).
MAX_OUTPUT_TRIALS = 16
#: The most model lists (``visible_models``, as GET /v1/models asks) a reload asks for: one per role and team.
MAX_LIST_TRIALS = 16
#: What each trial request asks, and the completion bound it gives.
TRIAL_MESSAGES = [{"role": "user", "content": "hello"}]
TRIAL_MAX_TOKENS = 16
#: The output each output trial judges: one final window, as a plain completion is judged.
TRIAL_OUTPUT = "Hello! How can I help you today?"
#: The team of a trial principal when the data names none: a team the data does not know.
TRIAL_TEAM = "policy-trial-team"
#: The obligations an output trial shows when its request was denied (the output rule is still asked).
_TRIAL_OBLIGATIONS = Obligations(max_tokens=TRIAL_MAX_TOKENS, prompt_logging="full")
#: The usage a trial request shows: nothing used yet.
_NOTHING_USED = {"requests_last_minute": 0, "tokens_last_minute": 0, "tokens_today": 0, "tokens_this_month": 0,
                 "in_flight": 0, "minute_window_frees_in_s": 0}


def trial_inputs(registry: Registry, data: Any) -> list[tuple[str, dict[str, Any]]]:
    """(label, policy input) of the request trials for ``data`` (the policy's base data) and ``registry``.

    Every role and every team (no team first) is tried on every model
    before any further pairing of a role with a team: the ``i``-th trial of
    a model pairs role ``i`` with team ``i`` (each list repeated as needed),
    then the remaining role and team pairs follow, all cut at
    :data:`MAX_TRIALS`.
    """
    config = data.get("govgate_config") if isinstance(data, dict) else None
    config = config if isinstance(config, dict) else {}
    roles = _names(config.get("roles"))
    teams: list[str | None] = [None, *(_team_names(config) or [TRIAL_TEAM])]
    models = [spec for spec in (registry.get(name) for name in registry.names()) if spec is not None]
    inputs: list[tuple[str, dict[str, Any]]] = []
    for role, team, spec in _combinations(roles or [None], teams, models):
        if len(inputs) >= MAX_TRIALS:
            break
        principal = Principal(id="policy-trial", team=team, roles=() if role is None else (role,),
                              key_id="policy-trial")
        usage = {"principal": dict(_NOTHING_USED), "team": None if team is None else dict(_NOTHING_USED)}
        document = build_input(principal=principal, endpoint="chat.completions", model=spec,
                               max_tokens=TRIAL_MAX_TOKENS, stream=False, purpose=None, messages=TRIAL_MESSAGES,
                               usage=usage)
        inputs.append((_label(role, team, spec.name), document))
    return inputs


def policy_trial(registry: Registry) -> Callable[[Any], Awaitable[str | None]]:
    """What :class:`gateway.policy.reloader.ReloadingPolicyEngine` runs on a new engine before it swaps it in."""

    async def trial(engine: Any) -> str | None:
        snapshot = getattr(engine, "snapshot", None)
        data = snapshot.base_data() if snapshot is not None else None
        outputs: dict[tuple[Any, Any], tuple[str, dict[str, Any]]] = {}
        lists: dict[tuple[Any, Any], tuple[str, dict[str, Any], list[dict[str, Any]]]] = {}
        for label, document in trial_inputs(registry, data):
            who = (tuple(document["principal"]["roles"]), document["principal"]["team"])
            listing = lists.setdefault(who, (label.rsplit(", model ", 1)[0], document["principal"], []))
            listing[2].append(document["model"])
            decision = checked_decision(await engine.decide(document), TRIAL_MAX_TOKENS)
            errors = [reason.message for reason in decision.reasons if reason.code == POLICY_ERROR]
            if errors and not decision.is_unavailable:
                return f"the policy fails on a request of {label}: {errors[0]}"
            key = (tuple(document["principal"]["roles"]), document["model"]["name"])
            if len(outputs) < MAX_OUTPUT_TRIALS and key not in outputs:
                obligations = decision.obligations if decision.allow else _TRIAL_OBLIGATIONS
                outputs[key] = (label, output_policy_input(document, obligations, TRIAL_OUTPUT))
        if not hasattr(engine, "decide_output"):  # a test's stand-in that decides requests only
            return None
        for label, principal, models in list(lists.values())[:MAX_LIST_TRIALS]:
            try:
                listed = await engine.visible_models_known(principal, models)
            except PolicyUnavailable:  # capacity, not the policy's fault
                continue
            if listed is None:
                return (f"the policy fails listing the models of {label}: its visible_models evaluation "
                        "failed (GET /v1/models would answer policy_error)")
        for label, document in outputs.values():
            verdict = await engine.decide_output(document)
            if verdict.is_policy_error and not verdict.is_unavailable:
                errors = [reason.message for reason in verdict.reasons if reason.code == POLICY_ERROR]
                return f"the policy fails on an output of {label}: {errors[0]}"
        return None

    return trial


def _combinations(roles: list[str | None], teams: list[str | None],
                  models: list[Any]) -> Iterator[tuple[str | None, str | None, Any]]:
    """(role, team, model): first each role and team on each model, then the other role-team pairs."""
    first = [(roles[i % len(roles)], teams[i % len(teams)]) for i in range(max(len(roles), len(teams)))]
    for role, team in first:
        for spec in models:
            yield role, team, spec
    for role in roles:
        for team in teams:
            if (role, team) not in first:
                for spec in models:
                    yield role, team, spec


def _names(section: Any) -> list[str]:
    return sorted(section) if isinstance(section, dict) else []


def _team_names(config: dict[str, Any]) -> list[str]:
    """The teams the data names (``teams`` and ``limits.teams``), without the ``default`` convention."""
    limits = config.get("limits")
    named = set(_names(config.get("teams")))
    named.update(_names(limits.get("teams") if isinstance(limits, dict) else None))
    return sorted(named - {"default"})


def _label(role: str | None, team: str | None, model: str) -> str:
    role_part = "(no role)" if role is None else repr(role)
    team_part = "no team" if team is None else f"team {team!r}"
    return f"role {role_part}, {team_part}, model {model!r}"
