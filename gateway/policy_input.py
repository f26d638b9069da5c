"""Building the policy input document (DESIGN.md, "Policy input").

One function so both endpoints, ``policy explain`` and later the replay tool
describe a request to the policy in exactly the same way.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from gateway.auth import Principal
from workers.registry import ModelSpec


def time_view(now_ns: int | None = None) -> dict[str, Any]:
    now_ns = time.time_ns() if now_ns is None else now_ns
    moment = datetime.fromtimestamp(now_ns / 1e9, tz=timezone.utc)
    return {"now_ns": now_ns, "hour_utc": moment.hour, "weekday": moment.strftime("%A")}


def build_input(*, principal: Principal, endpoint: str, model: ModelSpec, max_tokens: int,
                stream: bool, purpose: str | None, messages: list[dict[str, str]] | None = None,
                prompt: str | None = None, now_ns: int | None = None) -> dict[str, Any]:
    """The ``input`` document for one request."""
    if messages is not None:
        text = "\n".join(m["content"] for m in messages)
    else:
        text = prompt or ""
    request: dict[str, Any] = {
        "endpoint": endpoint,
        "model": model.name,
        "text": text,
        "max_tokens": max_tokens,
        "stream": stream,
        "purpose": purpose,
    }
    if messages is not None:
        request["messages"] = messages
    else:
        request["prompt"] = prompt
    return {
        "principal": principal.policy_view(),
        "request": request,
        "model": model.policy_view(),
        "time": time_view(now_ns),
    }
