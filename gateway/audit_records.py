"""What a request's audit entry records of its prompt and its decision.

Kept apart from the request service because these are rules about the log,
not about serving: the ``prompt_logging`` obligation decides how much of the
prompt is stored, and texts the policy's detectors found are never stored in
clear, not even inside the recorded decision.
"""

from __future__ import annotations

import hashlib
from typing import Any

from gateway.normalize import normalized_text
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
    The detectors look at the normalised view of the prompt, so a finding
    may be spelt differently in what was sent (a zero-width space inside a
    card number, a number split across messages); when a finding is still
    there after the replacements, the prompt is withheld (only its SHA-256
    is stored), never stored with the finding in it.
    """
    text = prompt_text(messages, prompt)
    if mode == "hash":
        return {"prompt_logging": mode, "prompt_sha256": hashlib.sha256(text.encode()).hexdigest()}
    if mode == "redacted":
        texts = sorted({item["text"] for item in redact if item.get("text")}, key=len, reverse=True)
        labels = {item["text"]: item.get("detector", "pii") for item in redact if item.get("text")}

        def scrub(content: str) -> str:
            for found in texts:
                content = content.replace(found, f"[REDACTED:{labels[found]}]")
            return content

        found = sorted({item.get("detector", "pii") for item in redact})
        scrubbed_messages = [{**m, "content": scrub(m["content"])} for m in messages] if messages is not None else None
        scrubbed_prompt = scrub(prompt or "") if messages is None else None
        view = normalized_text(scrubbed_messages, scrubbed_prompt)
        if any(t in view for t in texts):
            return {"prompt_logging": mode, "redacted": found, "prompt_withheld": True,
                    "prompt_sha256": hashlib.sha256(text.encode()).hexdigest()}
        if scrubbed_messages is not None:
            return {"prompt_logging": mode, "redacted": found, "messages": scrubbed_messages}
        return {"prompt_logging": mode, "redacted": found, "prompt": scrubbed_prompt}
    return {"prompt_logging": mode, **({"messages": messages} if messages is not None else {"prompt": prompt})}
