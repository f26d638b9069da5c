"""Policy decisions: the Decision contract, the policy revision, the engines.

The gateway asks a :class:`PolicyEngine` for a :class:`Decision` on every
request and records the engine's ``revision`` with it.
"""

from gateway.policy.decision import (
    POLICY_ERROR,
    POLICY_TIMEOUT,
    PROMPT_LOGGING_LEVELS,
    Decision,
    MalformedDecision,
    Obligations,
    Reason,
)
from gateway.policy.engine import (
    DECISION_RULE,
    VISIBLE_MODELS_RULE,
    EmbeddedPolicyEngine,
    PolicyEngine,
    PolicyLoadError,
)
from gateway.policy.revision import PolicyFilesError, PolicySnapshot, policy_files, policy_revision, read_policy

__all__ = [
    "DECISION_RULE",
    "POLICY_ERROR",
    "POLICY_TIMEOUT",
    "PROMPT_LOGGING_LEVELS",
    "VISIBLE_MODELS_RULE",
    "Decision",
    "EmbeddedPolicyEngine",
    "MalformedDecision",
    "Obligations",
    "PolicyEngine",
    "PolicyFilesError",
    "PolicyLoadError",
    "PolicySnapshot",
    "Reason",
    "policy_files",
    "policy_revision",
    "read_policy",
]
