"""What of a conversation the audit log may keep: masks and keyed digests.

Applies the ``prompt_logging`` obligation (README, "Audit") the same way for
the gateway's prompts and the workers' outputs; digests are HMAC-SHA256
under a secret key (docs/architecture.md, "Design notes by package", workers).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Iterable, Mapping

FULL = "full"
REDACTED = "redacted"
HASH = "hash"

#: The keys of an entry's texts (prompt or messages, output, what the client received) as ``prompt_logging`` let them be kept.
#: They go to the entry's erasable payload, never into its chained body (audit chain format 2), so
#: ``govgate audit prune`` can erase them while the chain still verifies. Digests, masks'
#: markers and lengths stay in the body. (``stop``: the stop sequences a gateway older than 2026-12-01 kept under
#: ``full``; they are kept as digests only now, but an old entry's still go to the payload.)
TEXT_KEYS = ("messages", "prompt", "output", "client_output", "stop")


def split_texts(body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``body`` without its texts, and the texts as the entry's payload (None when it has none)."""
    payload = {key: body[key] for key in TEXT_KEYS if key in body}
    if not payload:
        return dict(body), None
    return {key: value for key, value in body.items() if key not in payload}, payload


def texts_of(body: Mapping[str, Any], payload: Mapping[str, Any] | None) -> dict[str, Any]:
    """The texts an entry keeps: its payload, or, for an entry of chain format 1, those in its body.

    Empty when the entry never had any or they were erased (``govgate audit prune``).
    """
    if payload is not None:
        return {key: payload[key] for key in TEXT_KEYS if key in payload}
    return {key: body[key] for key in TEXT_KEYS if key in body}


class Digester:
    """Keyed digests (HMAC-SHA256, hex) of texts the log must not keep in clear."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def hexdigest(self, data: str | bytes) -> str:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        return hmac.new(self._key, raw, hashlib.sha256).hexdigest()


def mask(text: str, redact: Iterable[Mapping[str, Any]]) -> str:
    """``text`` with every finding replaced by ``[REDACTED:<detector>]`` (longest first)."""
    for item in sorted(redact, key=lambda r: -len(r.get("text") or "")):
        if item.get("text"):
            text = text.replace(item["text"], f"[REDACTED:{item.get('detector', 'pii')}]")
    return text


def logged_output(output: str, mode: str, redact: Iterable[Mapping[str, Any]],
                  digester: Digester | None, *, unjudged: bool = False) -> dict[str, Any]:
    """The ``output`` fields of a terminal entry as ``prompt_logging`` allows them.

    A mode the worker does not know is treated as ``hash``, the most private;
    without a digester a hashed output is recorded by its length alone.
    ``unjudged``: output rules apply but did not judge all of this text (a
    stream cancelled, timed out or failed mid-way, the tail generated after
    a stop): its findings are unknown, so ``redacted`` cannot mask them and
    keeps it as ``hash`` does, marked ``output_withheld``, as a prompt whose
    findings cannot be masked is withheld.
    """
    if mode == FULL:
        return {"output": output}
    if mode == REDACTED and unjudged and output:
        digest = {"output_hmac_sha256": digester.hexdigest(output)} if digester is not None else {}
        return {**digest, "output_chars": len(output), "output_withheld": True}
    if mode == REDACTED:
        masked = mask(output, redact)
        # Marked when the log no longer holds the text itself: it cannot be served again from the log.
        return {"output": masked, **({"output_masked": True} if masked != output else {})}
    digest = {"output_hmac_sha256": digester.hexdigest(output)} if digester is not None else {}
    return {**digest, "output_chars": len(output)}
