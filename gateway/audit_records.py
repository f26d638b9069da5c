"""What a request's audit entry records of its prompt and its decision.

Kept apart from the request service because these are rules about the log,
not about serving: the ``prompt_logging`` obligation decides how much of the
prompt is stored, and texts the policy's detectors found are never stored in
clear, not even inside the recorded decision.
"""

from __future__ import annotations

import hashlib
from typing import Any

from gateway.policy import Decision
from gateway.policy_input import prompt_text


def decision_for_audit(decision: Decision) -> dict[str, Any]:
    """The decision as recorded: the texts the detectors found are replaced by their SHA-256.

    The ``redact`` obligation names what must not be stored in clear; storing
    it verbatim beside the redacted prompt would undo the redaction.
    """
    document = decision.to_document()
    redact = document.get("obligations", {}).get("redact")
    if redact:
        document["obligations"]["redact"] = [
            {"detector": item["detector"], "sha256": hashlib.sha256(item["text"].encode()).hexdigest()}
            for item in redact]
    return document


def logged_prompt(messages: list[dict[str, str]] | None, prompt: str | None, mode: str,
                   redact: list[dict[str, str]]) -> dict[str, Any]:
    """The prompt as the ``prompt_logging`` obligation allows it to be stored.

    ``full`` stores it; ``redacted`` stores it with every text the policy's
    detectors found (the ``redact`` obligation) replaced by
    ``[REDACTED:<detector>]``; ``hash`` stores only a SHA-256 of its text.
    """
    if mode == "hash":
        text = prompt_text(messages, prompt)
        return {"prompt_logging": mode, "prompt_sha256": hashlib.sha256(text.encode()).hexdigest()}
    if mode == "redacted":
        def scrub(text: str) -> str:
            for item in sorted(redact, key=lambda r: -len(r.get("text", ""))):
                if item.get("text"):
                    text = text.replace(item["text"], f"[REDACTED:{item.get('detector', 'pii')}]")
            return text

        found = sorted({item.get("detector", "pii") for item in redact})
        if messages is not None:
            return {"prompt_logging": mode, "redacted": found,
                    "messages": [{**m, "content": scrub(m["content"])} for m in messages]}
        return {"prompt_logging": mode, "redacted": found, "prompt": scrub(prompt or "")}
    return {"prompt_logging": mode, **({"messages": messages} if messages is not None else {"prompt": prompt})}
