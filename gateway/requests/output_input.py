"""Building the output policy input: one window of generated text in its request's context.

``data.govgate.output_decision`` (policies/output.rego) sees the request as
its own input described it (principal, model, request fields but no prompt
text), the request's decision (its obligations with the redact texts reduced
to detector names: the prompt's findings are not the output's business, and
must not travel with every window), and the window, raw and normalised as
prompts are (:mod:`gateway.requests.normalize`). docs/architecture.md,
"Output policy input and decision".
"""

from __future__ import annotations

from typing import Any, Mapping

from gateway.policy.decision import Decision, Obligations
from gateway.requests.normalize import normalize

#: The fields of the request's ``input.request`` the output decision sees (no prompt text).
REQUEST_FIELDS = ("endpoint", "model", "purpose", "stream", "max_tokens")


def output_policy_input(policy_input: Mapping[str, Any] | None,
                        decision: Decision | Obligations | Mapping[str, Any] | None,
                        text: str, *, offset: int = 0, final: bool = True) -> dict[str, Any]:
    """The ``input`` of the output decision on ``text``, a window of the output.

    ``policy_input`` is the request's policy input (``build_input``; or the
    copy an audit entry keeps, which lacks only the prompt fields) and
    ``decision`` the decision that admitted the request: a :class:`Decision`,
    its :class:`Obligations`, or either's document (``to_document()``, as the
    audit entry keeps it). ``offset`` counts the characters of output before
    the window; ``final`` says the window reaches the end of the output (a
    plain completion is one final window at offset 0).
    """
    if offset < 0:
        raise ValueError("offset must not be negative")
    policy_input = policy_input or {}
    request = policy_input.get("request")
    request = request if isinstance(request, Mapping) else {}
    return {
        "principal": policy_input.get("principal"),
        "model": policy_input.get("model"),
        "request": {field: request.get(field) for field in REQUEST_FIELDS},
        "decision": {"allow": True, "obligations": _obligations_view(decision)},
        "output": {"text": text, "normalized_text": normalize(text), "offset": offset, "final": final},
    }


def _obligations_view(decision: Decision | Obligations | Mapping[str, Any] | None) -> dict[str, Any]:
    """The obligations with ``redact`` as the sorted names of the detectors that found something."""
    if isinstance(decision, Decision):
        decision = decision.obligations
    if isinstance(decision, Obligations):
        doc: dict[str, Any] = decision.to_document()
    elif isinstance(decision, Mapping):
        inner = decision.get("obligations")  # a decision document, or the obligations themselves
        doc = dict(inner) if isinstance(inner, Mapping) else dict(decision)
    else:
        doc = {}
    redact = doc.get("redact")
    if isinstance(redact, list):
        doc["redact"] = sorted({item["detector"] for item in redact
                                if isinstance(item, Mapping) and isinstance(item.get("detector"), str)})
    return doc
