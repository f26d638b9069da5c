"""A new policy revision is tried on requests shaped like real ones before it replaces a working one.

Loading checks the modules compile, the entry points exist and the data is
usable (``config_problems``); the evaluators' start also evaluates the
decision once on an empty input. A module whose rules conflict, or that
fails, only for real inputs (``decision`` defined twice when
``input.request.model`` is one of the models; a builtin given a field of
the wrong type) passed all of that and then answered ``policy_error`` to
every such request: a working policy replaced by one that refuses everyone.

So a reload first asks the new engine for decisions on requests shaped like
real ones (saying "hello", no usage yet): every role the new data names, on
every model the registry serves, for a principal without a team, for each
team the data names (``teams`` and ``limits.teams``) and for a made-up
team, up to :data:`MAX_TRIALS` (role, team, model) combinations, each asked
in every shape of :data:`~gateway.requests.trial_shapes.REQUEST_SHAPES` (a
chat request with ``max_tokens`` 16, the same streamed, a
``/v1/completions`` request, and a chat request asking the model's whole
context), each at another hour of the coming week
(:mod:`gateway.requests.trial_times`: every weekday and hour is asked).
Each decision goes through
the gateway's own checks (:func:`checked_decision`, the admission path's:
an allow with ``max_tokens`` 0 is a ``policy_error`` there too). Then the
output rule is asked about a representative output for each (role, team,
model) (up to :data:`MAX_OUTPUT_TRIALS`), in every window of
:data:`~gateway.requests.trial_shapes.OUTPUT_WINDOWS` (a final window on
either endpoint, a stream's non-final and final ones). The revision is
refused, keeping the running one, when any answer is a ``policy_error``,
or when listing the models a role and team may use (``visible_models``,
as ``GET /v1/models`` asks; up to :data:`MAX_LIST_TRIALS`) fails.
The gaps closed one by one each let a policy through that broke every real
request of its kind: no team, the gateway's own checks, no output trial
(probe h10 F5); an output trial per role only (its one team), one request
shape only, one final output window only (probe p3 F6); one moment only
(q3 F4). The same trial runs when the gateway starts (``govgate serve``/
``up`` refuse such a folder). The decisions are asked several at once
(:mod:`gateway.requests.trial_runner`: as many as the engine has evaluators).

A denial is an answer; so is "unavailable" for want of capacity (no free
evaluator, OPA not answering), which says nothing about the policy and must
not block a reload: such decisions are counted and a warning says how many
went untried. A decision that runs past the decision timeout is different:
the policy was asked and is too slow, and real requests like it would get
503 ``policy_unavailable`` too. It was skipped as "unavailable", so a policy
too slow for its timeout passed without having answered anything (probe q3,
closing note); it is now asked once more (one slow moment, a busy host, is
not the policy's fault) and a second timeout refuses the revision, naming
the request and the timeout.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

from gateway.auth import Principal
from gateway.policy import POLICY_ERROR, POLICY_UNAVAILABLE, Decision, Obligations, PolicyTimeout, PolicyUnavailable
from gateway.policy.decision import Reason
from gateway.requests.decision_checks import checked_decision
from gateway.requests.output_input import output_policy_input
from gateway.requests.policy_input import build_input
from gateway.requests.schemas import CHAT
from gateway.requests.trial_runner import again_if_timed_out, ask_all, trial_width
from gateway.requests.trial_shapes import (OUTPUT_WINDOWS, REQUEST_SHAPES, TRIAL_MAX_TOKENS, TRIAL_MESSAGES,
                                           OutputWindow, RequestShape)
from gateway.requests.trial_times import HOURS_OF_WEEK, describe_moment, trial_moment
from workers.contract.registry import ModelSpec, Registry

log = logging.getLogger(__name__)

#: The most (role, team, model) combinations a reload asks about, each in every request shape (4: at most
#: 256 decisions).
MAX_TRIALS = 64
#: The most combinations whose output rule a reload asks (in the request trials' order), each on every output
#: window (4: at most 128 decisions).
MAX_OUTPUT_TRIALS = 32
#: The most model lists (``visible_models``, as GET /v1/models asks) a reload asks for: one per role and team.
MAX_LIST_TRIALS = 16
#: The team of a trial principal when the data names none: a team the data does not know.
TRIAL_TEAM = "policy-trial-team"
#: The obligations an output trial shows when its request was denied (the output rule is still asked).
_TRIAL_OBLIGATIONS = Obligations(max_tokens=TRIAL_MAX_TOKENS, prompt_logging="full")
#: The usage a trial request shows: nothing used yet.
_NOTHING_USED = {"requests_last_minute": 0, "tokens_last_minute": 0, "tokens_today": 0, "tokens_this_month": 0,
                 "in_flight": 0, "minute_window_frees_in_s": 0}


@dataclass(frozen=True)
class TrialRequest:
    """One trial request: what the log calls it, its shape, its model and its policy input."""

    label: str
    shape: RequestShape
    model: ModelSpec
    document: dict[str, Any]

    @property
    def who(self) -> tuple[tuple[str, ...], str | None]:
        """The trial principal's (roles, team)."""
        return tuple(self.document["principal"]["roles"]), self.document["principal"]["team"]


def trial_inputs(registry: Registry, data: Any, *, now_ns: int | None = None) -> list[TrialRequest]:
    """The request trials for ``data`` (the policy's base data) and ``registry``, each combination in every shape.

    Every role and every team (no team first) is tried on every model
    before any further pairing of a role with a team: the ``i``-th trial of
    a model pairs role ``i`` with team ``i`` (each list repeated as needed),
    then the remaining role and team pairs follow, all cut at
    :data:`MAX_TRIALS` combinations. Request ``i`` is asked at ``now_ns``
    (default: the present) plus ``i`` hours, round the week
    (:mod:`gateway.requests.trial_times`); fewer than
    :data:`~gateway.requests.trial_times.HOURS_OF_WEEK` requests are followed
    by chat requests of the combinations in turn until every hour of the
    week has one.
    """
    config = data.get("govgate_config") if isinstance(data, dict) else None
    config = config if isinstance(config, dict) else {}
    roles = _names(config.get("roles"))
    # The made-up team always: keys may name teams the data does not, and a rule can fail only for those
    # (probe q3 F1: it was asked only when the data named no team at all).
    named = _team_names(config)
    teams: list[str | None] = [None, *named, *([TRIAL_TEAM] if TRIAL_TEAM not in named else [])]
    models = [spec for spec in (registry.get(name) for name in registry.names()) if spec is not None]
    combinations = list(_combinations(roles or [None], teams, models))
    _warn_cut("request", [(role, team, spec.name) for role, team, spec in combinations], MAX_TRIALS)
    combinations = combinations[:MAX_TRIALS]
    asked = [(combination, shape) for combination in combinations for shape in REQUEST_SHAPES]
    if asked and len(asked) < HOURS_OF_WEEK:  # every hour of the week: the chat shape of each in turn
        asked += [(combinations[i % len(combinations)], REQUEST_SHAPES[0])
                  for i in range(HOURS_OF_WEEK - len(asked))]
    start_ns = time.time_ns() if now_ns is None else now_ns
    return [_trial_request(role, team, spec, shape, trial_moment(start_ns, index))
            for index, ((role, team, spec), shape) in enumerate(asked)]


def _trial_request(role: str | None, team: str | None, spec: ModelSpec, shape: RequestShape,
                   now_ns: int) -> TrialRequest:
    """One trial request: the principal of ``role`` and ``team`` asking ``spec`` in ``shape`` at ``now_ns``."""
    principal = Principal(id="policy-trial", team=team, roles=() if role is None else (role,), key_id="policy-trial")
    usage = {"principal": dict(_NOTHING_USED), "team": None if team is None else dict(_NOTHING_USED)}
    chat = shape.endpoint == CHAT
    document = build_input(principal=principal, endpoint=shape.endpoint, model=spec,
                           max_tokens=shape.max_tokens(spec), stream=shape.stream, purpose=None,
                           messages=TRIAL_MESSAGES if chat else None,
                           prompt=None if chat else TRIAL_MESSAGES[0]["content"], usage=usage, now_ns=now_ns)
    return TrialRequest(_label(role, team, spec.name), shape, spec, document)


def policy_trial(registry: Registry) -> Callable[[Any], Awaitable[str | None]]:
    """What :class:`gateway.policy.reloader.ReloadingPolicyEngine` runs on a new engine before it swaps it in,
    and ``govgate serve`` on the engine it starts with (``govgate/cli.py``)."""

    async def trial(engine: Any) -> str | None:
        snapshot = getattr(engine, "snapshot", None)
        data = snapshot.base_data() if snapshot is not None else None
        width = trial_width(engine)
        no_answer = _NoAnswer()
        requests = trial_inputs(registry, data)
        answers = await ask_all([functools.partial(_ask_request, engine, request) for request in requests], width,
                                lambda answer: answer[1] is not None)
        #: (roles, team, model name, shape): the trial request and the obligations an output of it carries
        decided: dict[tuple[Any, ...], tuple[TrialRequest, Obligations]] = {}
        lists: dict[tuple[Any, Any], tuple[str, dict[str, Any], list[dict[str, Any]]]] = {}
        for request, answer in zip(requests, answers):
            if answer is None:  # not asked: an earlier one failed
                break
            decision, refusal = answer
            if refusal is not None:
                return refusal
            no_answer.count(decision.is_unavailable, decision.reasons)
            listing = lists.setdefault(request.who, (request.label.rsplit(", model ", 1)[0],
                                                     request.document["principal"], []))
            if request.document["model"] not in listing[2]:
                listing[2].append(request.document["model"])
            decided.setdefault((*request.who, request.model.name, request.shape),
                               (request, decision.obligations if decision.allow else _TRIAL_OBLIGATIONS))
        if not hasattr(engine, "decide_output"):  # a test's stand-in that decides requests only
            no_answer.warn()
            return None
        _warn_cut("model list", [(who[0][0] if who[0] else None, who[1], None) for who in lists], MAX_LIST_TRIALS)
        listed = await ask_all([functools.partial(_ask_list, engine, *listing, no_answer)
                                for listing in list(lists.values())[:MAX_LIST_TRIALS]], width,
                               lambda refusal: refusal is not None)
        refusal = next((refusal for refusal in listed if refusal is not None), None)
        if refusal is not None:
            return refusal
        every = list(dict.fromkeys(key[:3] for key in decided))
        _warn_cut("output", [(roles[0] if roles else None, team, model) for roles, team, model in every],
                  MAX_OUTPUT_TRIALS)
        outputs = [(decided[(*combination, window.shape)], window)
                   for combination in every[:MAX_OUTPUT_TRIALS] for window in OUTPUT_WINDOWS]
        judged = await ask_all([functools.partial(_ask_output, engine, *pair, no_answer) for pair in outputs], width,
                               lambda refusal: refusal is not None)
        refusal = next((refusal for refusal in judged if refusal is not None), None)
        if refusal is None:
            no_answer.warn()
        return refusal

    return trial


async def _ask_request(engine: Any, request: TrialRequest) -> tuple[Decision, str | None]:
    """The checked decision on ``request`` (asked again if it timed out), and the refusal it makes, if any."""
    decision = await again_if_timed_out(lambda: engine.decide(request.document), _timed_out)
    decision = checked_decision(decision, request.shape.max_tokens(request.model))
    where = (f"a request of {request.label} ({request.shape.describe(request.model)}) "
             f"at {describe_moment(request.document.get('time'))}")
    if decision.timed_out:
        return decision, _too_slow(where, decision.reasons)
    errors = [reason.message for reason in decision.reasons if reason.code == POLICY_ERROR]
    if errors and not decision.is_unavailable:
        return decision, f"the policy fails on {where}: {errors[0]}"
    return decision, None


async def _ask_list(engine: Any, label: str, principal: dict[str, Any], models: list[dict[str, Any]],
                    no_answer: "_NoAnswer") -> str | None:
    """The refusal the model list of ``principal`` makes (GET /v1/models would fail), if any."""
    where = f"listing the models of {label}"
    try:
        try:
            listed = await engine.visible_models_known(principal, models)
        except PolicyTimeout:
            listed = await engine.visible_models_known(principal, models)
    except PolicyTimeout as exc:
        return _too_slow(where, (Reason(POLICY_UNAVAILABLE, str(exc)),))
    except PolicyUnavailable as exc:  # capacity, not the policy's fault
        no_answer.count(True, (Reason(POLICY_UNAVAILABLE, str(exc)),))
        return None
    if listed is None:
        return (f"the policy fails {where}: its visible_models evaluation failed (GET /v1/models would answer "
                "policy_error)")
    no_answer.count(False, ())
    return None


async def _ask_output(engine: Any, asked: tuple[TrialRequest, Obligations], window: OutputWindow,
                      no_answer: "_NoAnswer") -> str | None:
    """The refusal the output rule's verdict on ``window`` of ``asked``'s request makes, if any."""
    request, obligations = asked
    document = output_policy_input(request.document, obligations, window.text, offset=window.offset,
                                   final=window.final)
    verdict = await again_if_timed_out(lambda: engine.decide_output(document), _timed_out)
    where = f"an output of {request.label} ({window.describe(request.model)})"
    if verdict.timed_out:
        return _too_slow(where, verdict.reasons)
    if verdict.is_policy_error and not verdict.is_unavailable:
        errors = [reason.message for reason in verdict.reasons if reason.code == POLICY_ERROR]
        return f"the policy fails on {where}: {errors[0]}"
    no_answer.count(verdict.is_unavailable, verdict.reasons)
    return None


def _timed_out(answer: Any) -> bool:
    return bool(getattr(answer, "timed_out", False))


def _too_slow(where: str, reasons: tuple[Reason, ...]) -> str:
    """The refusal of a policy that ran past the decision timeout twice on the same question: real requests
    like it would get 503 policy_unavailable (it was skipped as "unavailable", probe q3 closing note)."""
    why = reasons[0].message if reasons else "the evaluation ran past the timeout"
    return (f"the policy did not answer {where} in time, twice: {why} (GOVGATE_POLICY_TIMEOUT_S); every such "
            "request would get 503 policy_unavailable: make the rule faster or raise the timeout")


class _NoAnswer:
    """The trial decisions that got no answer at all (no free evaluator, OPA not answering: not a timeout),
    which say nothing about the policy and are not tried: counted, and warned about once at the end."""

    def __init__(self) -> None:
        self.missed = 0
        self.asked = 0
        self.first: str | None = None

    def count(self, unavailable: bool, reasons: tuple[Reason, ...]) -> None:
        self.asked += 1
        if unavailable:
            self.missed += 1
            self.first = self.first or (reasons[0].message if reasons else "no answer")

    def warn(self) -> None:
        if self.missed:
            log.warning("policy trial: %d of %d decisions got no answer (first: %s), so those were not tried",
                        self.missed, self.asked, self.first)


def _combinations(roles: list[str | None], teams: list[str | None],
                  models: list[Any]) -> Iterator[tuple[str | None, str | None, Any]]:
    """(role, team, model): every role and every team first, then the other role-team pairs; the models
    rotate under the pairs, so each pair meets a model before any pair meets a second one.

    With the models innermost, the cap (:data:`MAX_TRIALS`) was spent on the first roles across every model:
    with 8 roles and 10 models two roles were never asked (probe q3 F2).
    """
    first = [(roles[i % len(roles)], teams[i % len(teams)]) for i in range(max(len(roles), len(teams)))]
    pairs = first + [(role, team) for role in roles for team in teams if (role, team) not in first]
    for turn in range(len(models)):
        for index, (role, team) in enumerate(pairs):
            yield role, team, models[(index + turn) % len(models)]


def _warn_cut(kind: str, combinations: list[tuple[str | None, str | None, str | None]], cap: int) -> None:
    """Log a warning when ``cap`` cuts the (role, team, model) ``combinations`` of a trial so that some roles,
    teams or models were never asked, naming them: the cut was silent (probe q3 F2), and an operator whose
    policy has more roles, teams or models than the trial asks should know which were never tried. A cut
    that left none unasked is logged at INFO."""
    if len(combinations) <= cap:
        return
    asked, left = combinations[:cap], combinations[cap:]
    never = []
    for index, what in enumerate(("roles", "teams", "models")):
        names = sorted({str(c[index]) for c in left if c[index] is not None} -
                       {str(c[index]) for c in asked if c[index] is not None})
        if names:
            never.append(f"{what} {', '.join(repr(name) for name in names)}")
    # A cut that still asked every role, team and model is the ordinary case (the shipped policy's lists and
    # outputs are cut at every trial): a warning at each reload would bury the one that matters.
    log.log(logging.WARNING if never else logging.INFO,
            "policy trial: %s trials cut at %d of %d (role, team, model) combinations; %s", kind, cap,
            len(combinations), "never asked: " + "; ".join(never) if never
            else "every role, team and model was asked in at least one")


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
