"""Turn chat messages into one prompt string, per model prompt format.

Why the stop sequences come back with the prompt: a base model given a
transcript happily writes the user's next turn too. The format that built the
transcript knows what the start of another turn looks like, so it says where
the assistant's turn ends; the backend cuts the text there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ROLES = ("system", "user", "assistant")

_PLAIN_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
_PLAIN_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")
_CHATML_END = "<|im_end|>"
#: Stanford Alpaca's instruction format (Dolly v2 was trained on the same layout).
_ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                    "Write a response that appropriately completes the request.")
_ALPACA_STOPS = ("### Instruction:", "### End")


def message_text(content: object) -> str:
    """The text of a message's ``content``: a string or OpenAI's list of parts.

    Text parts are joined with nothing between them, as OpenAI does; other
    part types (images, audio) cannot be given to a text model and are refused
    rather than silently dropped, so a policy never judges a prompt that
    differs from what the client sent.
    """
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"message content part of type {kind!r} is not supported; only text parts are")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"message content must be a string or a list of parts, not {type(content).__name__}")


def render_chat(messages: list[dict], prompt_format: str) -> tuple[str, tuple[str, ...]]:
    """Return ``(prompt, stop sequences)`` for ``messages`` in ``prompt_format``.

    ``"plain"`` is a completion-style transcript any base model can continue;
    ``"chatml"`` is the ``<|im_start|>`` format many chat-tuned models expect;
    ``"alpaca"`` is the instruction format of Alpaca and Dolly. All end by
    opening the assistant's turn. Raises ``ValueError`` for an
    unknown format, role or content shape.
    """
    turns = [_turn(i, m) for i, m in enumerate(messages)]
    if prompt_format == "plain":
        body = "".join(f"{_PLAIN_LABELS[role]}: {text}\n\n" for role, text in turns)
        return body + "Assistant:", _PLAIN_STOPS
    if prompt_format == "chatml":
        body = "".join(f"<|im_start|>{role}\n{text}{_CHATML_END}\n" for role, text in turns)
        return body + "<|im_start|>assistant\n", (_CHATML_END,)
    if prompt_format == "alpaca":
        return _alpaca(turns), _ALPACA_STOPS
    raise ValueError(f"unknown prompt format {prompt_format!r} (known: 'plain', 'chatml', 'alpaca')")


def _alpaca(turns: list[tuple[str, str]]) -> str:
    """Instruction/response blocks; a system message replaces the standard preamble.

    Alpaca was trained on single turns; earlier turns are kept as earlier
    instruction/response pairs so the model sees the conversation.
    """
    system = "\n".join(text for role, text in turns if role == "system")
    parts = [system or _ALPACA_PREAMBLE]
    for role, text in turns:
        if role == "user":
            parts.append(f"### Instruction:\n{text}")
        elif role == "assistant":
            parts.append(f"### Response:\n{text}")
    return "\n\n".join(parts) + "\n\n### Response:\n"


def _turn(index: int, message: object) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index} must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
    return role, message_text(message.get("content"))
