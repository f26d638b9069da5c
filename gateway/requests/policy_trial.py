"""A new policy revision is tried on requests shaped like real ones before it replaces a working one.

Loading checks the modules compile, the entry points exist and the data is
usable (``config_problems``); the evaluators' start also evaluates the
decision once on an empty input. A module whose rules conflict, or that
fails, only for real inputs (``decision`` defined twice when
``input.request.model`` is one of the models; a builtin given a field of
the wrong type) passed all of that and then answered ``policy_error`` to
every such request: a working policy replaced by one that refuses everyone.
So a reload first asks the new engine for one decision per role the new
data names and model the registry serves (a chat request saying "hello",
no usage yet, up to :data:`MAX_TRIALS` of them), and refuses the revision,
keeping the running one, when any answer is a ``policy_error``. A denial is
an answer; so is "unavailable" (capacity, a slow OPA), which says nothing
about the policy and must not block a reload.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from gateway.auth import Principal
from gateway.policy import POLICY_ERROR
from gateway.requests.policy_input import build_input
from workers.contract.registry import Registry

#: The most trial decisions a reload asks for (roles × models, in that order).
MAX_TRIALS = 64
#: What each trial request asks.
TRIAL_MESSAGES = [{"role": "user", "content": "hello"}]
#: The usage a trial request shows: nothing used yet.
_NOTHING_USED = {"requests_last_minute": 0, "tokens_last_minute": 0, "tokens_today": 0, "tokens_this_month": 0,
                 "in_flight": 0, "minute_window_frees_in_s": 0}


def trial_inputs(registry: Registry, data: Any) -> list[tuple[str, dict[str, Any]]]:
    """(label, policy input) for each role of ``data`` (the policy's base data) and model of ``registry``."""
    config = data.get("govgate_config") if isinstance(data, dict) else None
    roles = config.get("roles") if isinstance(config, dict) else None
    names = sorted(roles) if isinstance(roles, dict) else []
    inputs: list[tuple[str, dict[str, Any]]] = []
    for role in names or ["(no role)"]:
        principal = Principal(id="policy-trial", team=None, roles=(role,) if names else (), key_id="policy-trial")
        for model in registry.names():
            spec = registry.get(model)
            if spec is None or len(inputs) >= MAX_TRIALS:
                continue
            document = build_input(principal=principal, endpoint="chat.completions", model=spec, max_tokens=16,
                                   stream=False, purpose=None, messages=TRIAL_MESSAGES,
                                   usage={"principal": dict(_NOTHING_USED), "team": None})
            inputs.append((f"role {role!r}, model {model!r}", document))
    return inputs


def policy_trial(registry: Registry) -> Callable[[Any], Awaitable[str | None]]:
    """What :class:`gateway.policy.reloader.ReloadingPolicyEngine` runs on a new engine before it swaps it in."""

    async def trial(engine: Any) -> str | None:
        snapshot = getattr(engine, "snapshot", None)
        data = snapshot.base_data() if snapshot is not None else None
        for label, document in trial_inputs(registry, data):
            decision = await engine.decide(document)
            errors = [reason.message for reason in decision.reasons if reason.code == POLICY_ERROR]
            if errors and not decision.is_unavailable:
                return f"the policy fails on a request of {label}: {errors[0]}"
        return None

    return trial
