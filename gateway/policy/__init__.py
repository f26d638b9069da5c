"""Policy decisions: the Decision contract, the policy revision, the engines.

The gateway asks a :class:`PolicyEngine` for a :class:`Decision` on every
request (and for an :class:`OutputDecision` on what the model generates) and records the engine's ``revision`` with it. Two engines evaluate
the same folder: :class:`EmbeddedPolicyEngine` (regorus in a pool of child
processes) and :class:`OpaPolicyEngine` (an OPA server);
:func:`open_policy_engine` picks one from the settings.
"""

from typing import TYPE_CHECKING, Any

from gateway.policy.decision import (
    POLICY_ERROR,
    POLICY_TIMEOUT,
    POLICY_UNAVAILABLE,
    PROMPT_LOGGING_LEVELS,
    Decision,
    MalformedDecision,
    Obligations,
    PolicyUnavailable,
    Reason,
    Redaction,
)
from gateway.policy.output_decision import OUTPUT_DECISION_RULE, OutputDecision
from gateway.policy.engine import (
    DECISION_RULE,
    VISIBLE_MODELS_RULE,
    EmbeddedPolicyEngine,
    PolicyEngine,
    PolicyLoadError,
)
from gateway.policy.revision import (
    PolicyFilesError,
    PolicySnapshot,
    compute_revision,
    policy_files,
    policy_revision,
    read_policy,
)

if TYPE_CHECKING:
    from gateway.policy.factory import open_policy_engine
    from gateway.policy.opa import OpaPolicyEngine

# Imported on first use: the OPA engine pulls in aiohttp (~150 ms), which the
# embedded engine's evaluator processes, started again after every timeout,
# must not pay for.
_LAZY = {"OpaPolicyEngine": "gateway.policy.opa", "open_policy_engine": "gateway.policy.factory"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DECISION_RULE",
    "POLICY_ERROR",
    "POLICY_TIMEOUT",
    "POLICY_UNAVAILABLE",
    "PolicyUnavailable",
    "PROMPT_LOGGING_LEVELS",
    "VISIBLE_MODELS_RULE",
    "Decision",
    "EmbeddedPolicyEngine",
    "MalformedDecision",
    "Obligations",
    "OUTPUT_DECISION_RULE",
    "OutputDecision",
    "OpaPolicyEngine",
    "PolicyEngine",
    "PolicyFilesError",
    "PolicyLoadError",
    "PolicySnapshot",
    "Reason",
    "Redaction",
    "compute_revision",
    "open_policy_engine",
    "policy_files",
    "policy_revision",
    "read_policy",
]
