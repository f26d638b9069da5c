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

from gateway.policy.decision import Obligations
from gateway.requests.normalize import normalize

#: The fields of the request's ``input.request`` the output decision sees (no prompt text).
REQUEST_FIELDS = ("endpoint", "model", "purpose", "stream", "max_tokens")


def output_policy_input(request_input: Mapping[str, Any], obligations: Obligations | Mapping[str, Any],
                        text: str, *, offset: int = 0, final: bool = True) -> dict[str, Any]:
    """The ``input`` of the output decision on ``text``, a window of the output.

    ``request_input`` is the request's policy input (``build_input``; or the
    copy an audit entry keeps, which lacks only the prompt fields) and
    ``obligations`` the allowed decision's obligations (an
    :class:`Obligations` or its ``to_document()``). ``offset`` counts the
    characters of output before the window; ``final`` says the window
    reaches the end of the output (a plain completion is one final window
    at offset 0).
    """
    if offset < 0:
        raise ValueError("offset must not be negative")
    request = request_input.get("request")
    request = request if isinstance(request, Mapping) else {}
    return {
        "principal": request_input.get("principal"),
        "model": request_input.get("model"),
        "request": {field: request.get(field) for field in REQUEST_FIELDS},
        "decision": {"allow": True, "obligations": _obligations_view(obligations)},
        "output": {"text": text, "normalized_text": normalize(text), "offset": offset, "final": final},
    }


def _obligations_view(obligations: Obligations | Mapping[str, Any]) -> dict[str, Any]:
    """The obligations with ``redact`` as the sorted names of the detectors that found something."""
    doc = dict(obligations.to_document() if isinstance(obligations, Obligations) else obligations)
    redact = doc.get("redact")
    if isinstance(redact, list):
        doc["redact"] = sorted({item["detector"] for item in redact
                                if isinstance(item, Mapping) and isinstance(item.get("detector"), str)})
    return doc
