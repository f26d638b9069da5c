"""What a request counts against token budgets and tokens per minute: prompt plus completion.

Hosted APIs bill both, and a budget that counted only generated tokens let a
principal past it spend any number of prompt tokens. Admission holds the
prompt's tokens plus ``max_tokens``; the end of the request settles to the
prompt and completion tokens the worker reports.
"""

from __future__ import annotations

from typing import Any, Mapping

from gateway.requests.fit import MAX_BYTES_PER_TOKEN


def prompt_tokens_to_hold(counted: int | None, prompt_text: str) -> int:
    """The prompt's share of a reservation.

    The exact count when the gateway has the model's tokenizer; otherwise the
    least the prompt can be (its UTF-8 bytes over ``MAX_BYTES_PER_TOKEN``), so
    that no request is refused on a guess. The settlement then charges the
    worker's exact count, which may exceed what was held.
    """
    if counted is not None:
        return counted
    return len(prompt_text.encode("utf-8")) // MAX_BYTES_PER_TOKEN


def used_tokens(usage: Mapping[str, Any] | None) -> int:
    """Prompt plus completion tokens of a finished request (0 when the model never ran)."""
    usage = usage or {}
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
