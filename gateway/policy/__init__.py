"""Policy decisions: the Decision contract, the policy revision, the engines.

The gateway asks a :class:`PolicyEngine` for a :class:`Decision` on every
request (and for an :class:`OutputDecision` on what the model generates) and records the engine's ``revision`` with it. Two engines evaluate
the same folder: :class:`EmbeddedPolicyEngine` (regorus in a pool of child
processes) and :class:`OpaPolicyEngine` (an OPA server);
:func:`open_policy_engine` picks one from the settings.

Every name is imported on first use (:func:`__getattr__`): the embedded
engine's evaluator processes import ``gateway.policy.child``, which runs this
file first, and need none of them. Imported eagerly, the engine's pool
(asyncio) and the rest cost each evaluator ~10 MB of memory and its start
the time to import them (it is started again after every timeout); the OPA
engine's aiohttp alone was ~150 ms.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.policy.decision import (POLICY_ERROR, POLICY_TIMEOUT, POLICY_UNAVAILABLE, PROMPT_LOGGING_LEVELS,
                                         Decision, MalformedDecision, Obligations, PolicyTimeout, PolicyUnavailable,
                                         Reason, Redaction)
    from gateway.policy.engine import (DECISION_RULE, VISIBLE_MODELS_RULE, EmbeddedPolicyEngine, PolicyEngine,
                                       PolicyLoadError)
    from gateway.policy.factory import open_policy_engine
    from gateway.policy.opa import OpaPolicyEngine
    from gateway.policy.output_decision import OUTPUT_DECISION_RULE, OutputDecision
    from gateway.policy.revision import (PolicyFilesError, PolicySnapshot, compute_revision, policy_files,
                                         policy_revision, read_policy)

#: Each public name and the module that defines it.
_SOURCES = {
    **dict.fromkeys(("POLICY_ERROR", "POLICY_TIMEOUT", "POLICY_UNAVAILABLE", "PROMPT_LOGGING_LEVELS", "Decision",
                     "MalformedDecision", "Obligations", "PolicyTimeout", "PolicyUnavailable", "Reason",
                     "Redaction"), "gateway.policy.decision"),
    **dict.fromkeys(("OUTPUT_DECISION_RULE", "OutputDecision"), "gateway.policy.output_decision"),
    **dict.fromkeys(("DECISION_RULE", "VISIBLE_MODELS_RULE", "EmbeddedPolicyEngine", "PolicyEngine",
                     "PolicyLoadError"), "gateway.policy.engine"),
    **dict.fromkeys(("PolicyFilesError", "PolicySnapshot", "compute_revision", "policy_files", "policy_revision",
                     "read_policy"), "gateway.policy.revision"),
    "OpaPolicyEngine": "gateway.policy.opa",
    "open_policy_engine": "gateway.policy.factory",
}


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})


__all__ = sorted(_SOURCES)
