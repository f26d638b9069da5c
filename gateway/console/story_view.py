"""One request's story (the review service's answer) arranged for the request page.

The service gives entry documents; the page wants the prompt (chat
messages or a plain prompt), the output, the decision, the timings and the
usage in named places. Texts are found where ``audit/export.py`` puts them:
in the payload, or in the body for entries of chain format 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from audit.kinds import DELIVERED, REQUEST, TERMINAL_KINDS


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class StoryView:
    story: dict[str, Any]
    messages: list[Message]
    prompt: str | None
    output: str | None
    #: What the client received, when the output rules kept it apart from the output: from the terminal
    #: entry, or from the gateway's ``delivered`` entry when there is one (the terminal one could not say it, or
    #: said more than the client got).
    received: str | None
    erased: bool  # the texts were erased (payloads_erased) or never kept
    request: dict[str, Any] | None
    terminal: dict[str, Any] | None
    timings: list[tuple[str, str]]
    usage: dict[str, Any]


def _texts(entry: dict[str, Any] | None) -> dict[str, Any]:
    if entry is None:
        return {}
    payload = entry.get("payload")
    if isinstance(payload, dict):
        return payload
    body = entry.get("body")
    return body if isinstance(body, dict) else {}


def _content(value: Any) -> str:
    """A message's content as text (a list of parts is joined; anything else shown as it is)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in value)
    return "" if value is None else str(value)


def _parse(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def story_view(story: dict[str, Any]) -> StoryView:
    entries = story["entries"]
    request = next((e for e in entries if e["kind"] == REQUEST), None)
    terminal = next((e for e in entries if e["kind"] in TERMINAL_KINDS), None)
    asked, answered = _texts(request), _texts(terminal)
    raw_messages = asked.get("messages")
    messages = [Message(str(m.get("role", "?")), _content(m.get("content")))
                for m in raw_messages if isinstance(m, dict)] if isinstance(raw_messages, list) else []
    prompt = _content(asked["prompt"]) if "prompt" in asked else None
    output = _content(answered["output"]) if "output" in answered else None
    delivered = _texts(next((e for e in entries if e["kind"] == DELIVERED), None))
    sent = delivered if "client_output" in delivered else answered  # the gateway's, when it had to say it
    received = _content(sent["client_output"]) if "client_output" in sent else None
    body = terminal["body"] if terminal is not None else {}
    timings: list[tuple[str, str]] = []
    start = _parse(request["created_at"]) if request else None
    end = _parse(terminal["created_at"]) if terminal else None
    if start and end:
        timings.append(("total (request to end)", f"{(end - start).total_seconds() * 1000:.0f} ms"))
    for name, value in (body.get("timings") or {}).items():
        if isinstance(value, (int, float)):
            timings.append((name.removesuffix("_ms").replace("_", " "), f"{value:.0f} ms"))
    erased = request is not None and not messages and prompt is None
    return StoryView(story, messages, prompt, output, received, erased, request, terminal, timings,
                     body.get("usage") or {})
