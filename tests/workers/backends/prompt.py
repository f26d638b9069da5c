"""The prompt and settings the backend tests generate with, shared so every backend is asked the same."""

from __future__ import annotations

from workers.backends import SamplingParams

PROMPT = "System: be brief\n\nUser: open the gate\n\nAssistant:"
GREEDY = SamplingParams(max_tokens=40, temperature=0)


def is_printable_ascii(text: str) -> bool:
    """The tiny model's vocabulary is ASCII words: anything else is a decoding bug."""
    return text.isascii() and text.isprintable()
