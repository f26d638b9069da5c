"""One soak request as a client sends it (chat or text, streamed or not), recorded in a :class:`Sent`."""

from __future__ import annotations

import json
from typing import Any

from bench.soak_audit import DISCONNECTED, Sent

CHAT_PATH = "/v1/chat/completions"
TEXT_PATH = "/v1/completions"
REQUEST_ID_HEADER = "x-govgate-request-id"


def request_body(model: str, index: int, chat: bool, stream: bool, max_tokens: int) -> dict[str, Any]:
    """A short story request, numbered so each answer can be told apart in the audit."""
    text = f"Tell a short story number {index}."
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def _piece(event: dict[str, Any], chat: bool) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    if chat:
        return choices[0].get("delta", {}).get("content") or ""
    return choices[0].get("text") or ""


def _error_code(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "not-openai-shaped"


async def send_request(client: Any, path: str, body: dict[str, Any], record: Sent, chat: bool,
                       disconnect: bool) -> None:
    """One request; fills in ``record`` (outcome label, text, request id)."""
    import httpx

    try:
        if not record.stream:
            response = await client.post(path, json=body)
            record.status = response.status_code
            record.request_id = response.headers.get(REQUEST_ID_HEADER)
            if response.status_code != 200:
                record.outcome = f"{response.status_code} {_error_code(response.content)}"
                return
            choice = response.json()["choices"][0]
            record.text = (choice["message"]["content"] if chat else choice["text"]) or ""
            record.outcome, record.served = "200", True
            return
        async with client.stream("POST", path, json=body) as response:
            record.status = response.status_code
            record.request_id = response.headers.get(REQUEST_ID_HEADER)
            if response.status_code != 200:
                record.outcome = f"{response.status_code} {_error_code(await response.aread())}"
                return
            pieces = record.pieces
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        record.outcome, record.served = "200 stream [DONE]", True
                        return
                    event = json.loads(data)
                    if "error" in event:
                        record.outcome = f"200 stream error event {event['error'].get('code')}"
                        return
                    piece = _piece(event, chat)
                    pieces.append(piece)
                    if disconnect and piece:
                        record.outcome = DISCONNECTED
                        return  # leaving the block closes the connection
                record.outcome = "200 stream ended without [DONE]"
            finally:
                record.text = "".join(pieces)
    except httpx.HTTPError as exc:
        where = "mid-stream" if record.status is not None else "before an answer"
        record.outcome = record.outcome or f"transport {type(exc).__name__} {where}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        record.served = False
        record.outcome = f"{record.status} unreadable answer"
