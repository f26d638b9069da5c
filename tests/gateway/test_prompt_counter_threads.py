"""PromptCounter counts short prompts on the event loop and long ones on a worker thread."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from gateway.requests.fit import INLINE_COUNT_CHARS, PromptCounter


class _RecordingTokenizer:
    """Counts characters and remembers which thread counted."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def count(self, text: str) -> int:
        self.threads.append(threading.current_thread())
        return len(text)


def _counter_with(tokenizer: _RecordingTokenizer) -> tuple[PromptCounter, SimpleNamespace]:
    spec = SimpleNamespace(name="m", prompt_format="plain")
    counter = PromptCounter()
    counter._tokenizers[spec.name] = (tokenizer, float("inf"))  # loaded already
    return counter, spec


def test_short_prompt_is_counted_on_the_event_loop() -> None:
    tokenizer = _RecordingTokenizer()
    counter, spec = _counter_with(tokenizer)
    prompt = "x" * INLINE_COUNT_CHARS
    assert asyncio.run(counter.count(spec, None, prompt)) == INLINE_COUNT_CHARS
    assert tokenizer.threads == [threading.main_thread()]


def test_long_prompt_is_counted_on_a_worker_thread() -> None:
    tokenizer = _RecordingTokenizer()
    counter, spec = _counter_with(tokenizer)
    prompt = "x" * (INLINE_COUNT_CHARS + 1)
    assert asyncio.run(counter.count(spec, None, prompt)) == INLINE_COUNT_CHARS + 1
    assert len(tokenizer.threads) == 1 and tokenizer.threads[0] is not threading.main_thread()
