"""Building the policy input document (docs/architecture.md, "Policy input").

One module so both endpoints, ``policy explain`` and ``policy replay``
describe a request to the policy in exactly the same way.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from gateway.auth import Principal
from gateway.requests.normalize import normalize, normalized_text
from workers.contract.registry import ModelSpec

#: Fields of ``input.request`` that carry prompt text (kept out of the stored copy).
PROMPT_FIELDS = ("text", "normalized_text", "messages", "prompt")


def time_view(now_ns: int | None = None) -> dict[str, Any]:
    now_ns = time.time_ns() if now_ns is None else now_ns
    moment = datetime.fromtimestamp(now_ns / 1e9, tz=timezone.utc)
    return {"now_ns": now_ns, "hour_utc": moment.hour, "weekday": moment.strftime("%A")}


def prompt_text(messages: list[dict[str, str]] | None, prompt: str | None) -> str:
    """All prompt text as one string: what content rules look at (``input.request.text``)."""
    if messages is not None:
        return "\n".join(m["content"] for m in messages)
    return prompt or ""


def build_input(*, principal: Principal, endpoint: str, model: ModelSpec, max_tokens: int,
                stream: bool, purpose: str | None, messages: list[dict[str, str]] | None = None,
                prompt: str | None = None, usage: dict[str, Any] | None = None,
                now_ns: int | None = None) -> dict[str, Any]:
    """The ``input`` document for one request."""
    request: dict[str, Any] = {
        "endpoint": endpoint,
        "model": model.name,
        "text": prompt_text(messages, prompt),
        "normalized_text": normalized_text(messages, prompt),
        "max_tokens": max_tokens,
        "stream": stream,
        "purpose": purpose,
    }
    if messages is not None:
        request["messages"] = messages
    else:
        request["prompt"] = prompt
    document: dict[str, Any] = {
        "principal": principal.policy_view(),
        "request": request,
        "model": model.policy_view(),
        "time": time_view(now_ns),
    }
    if usage is not None:
        document["usage"] = usage
    return document


def with_normalized_text(document: Any) -> Any:
    """``document`` with ``request.normalized_text`` filled in from ``request.text`` when it lacks one.

    For inputs written by hand (``policy explain``): the gateway always sends
    both, and the content rules look at the normalised view.
    """
    if not isinstance(document, dict) or not isinstance(document.get("request"), dict):
        return document
    request = document["request"]
    if "normalized_text" in request or not isinstance(request.get("text"), str):
        return document
    return {**document, "request": {**request, "normalized_text": normalize(request["text"])}}


def without_prompt(document: dict[str, Any]) -> dict[str, Any]:
    """The input minus its prompt text, for the audit entry (the prompt is stored per ``prompt_logging``)."""
    request = {k: v for k, v in document["request"].items() if k not in PROMPT_FIELDS}
    return {**document, "request": request}
