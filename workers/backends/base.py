"""The contract every model backend meets, and the token loop they share.

One loop (:class:`GenerationRun`) so that the token counts and finish reasons
the log records mean the same whichever library runs the model. This module
imports no model library, so the gateway can use the types. See
docs/architecture.md, section "workers/backends and model files".
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from workers.contract.modelfile import GGUF_MAGIC, ModelFileError, UnsupportedGgufVersion, check_gguf_extent, file_magic
from workers.contract.registry import ModelSpec
from workers.contract.sampling import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class BackendError(RuntimeError):
    """The model cannot serve this request: file missing or unloadable, prompt too long, ..."""


class PromptTooLongError(BackendError):
    """Prompt plus requested completion do not fit the context window.

    A separate class because it is the caller's fault (an HTTP 400, OpenAI's
    ``context_length_exceeded``) while other backend errors are the server's.
    """

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            f"prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} exceeds the model's context of {context_length} tokens"
        )


@dataclass(frozen=True)
class Generation:
    """A finished completion with the counts an audit record needs."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop sequence) | "length" (hit max_tokens)


@runtime_checkable
class LoadedModel(Protocol):
    """A model in memory, ready to serve one generation at a time."""

    spec: ModelSpec

    @property
    def context_length(self) -> int:
        """Context slots the loaded model has; prompt + max_tokens must fit."""
        ...

    def count_tokens(self, text: str) -> int:
        """Context slots ``text`` takes when sent as a prompt (BOS included)."""
        ...

    def stream(self, prompt: str, params: SamplingParams) -> "GenerationRun":
        """Text pieces as they are generated; the run's counts are final once exhausted."""
        ...

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        """The whole completion; the same loop as :meth:`stream`, drained."""
        ...


class GenerationRun(Iterator[str]):
    """One generation: iterate for text pieces, then read the counts.

    ``token_ids`` yields sampled ids and simply ends at end-of-sequence (the
    eos id itself is not yielded); ``token_bytes`` gives each id's raw bytes.
    Pieces are decoded incrementally so a character split over byte tokens is
    never emitted half-way, and any tail of the text that could still grow
    into a stop sequence is held back until it can't.

    ``finish_reason`` is ``None`` until the run ends, and stays ``None`` if the
    consumer closes it early (the client went away: neither reason is true).
    """

    def __init__(
        self,
        token_ids: Iterator[int],
        token_bytes: Callable[[int], bytes],
        *,
        prompt_tokens: int,
        params: SamplingParams,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._token_ids = token_ids
        self._token_bytes = token_bytes
        self._params = params
        self._pieces = self._run()

    def __iter__(self) -> GenerationRun:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop early; frees the model for the next request."""
        self._pieces.close()
        self._close_token_ids()

    def collect(self) -> Generation:
        """Drain the run into a :class:`Generation`."""
        text = "".join(self)
        assert self.finish_reason is not None
        return Generation(text, self.prompt_tokens, self.completion_tokens, self.finish_reason)

    def _close_token_ids(self) -> None:
        close = getattr(self._token_ids, "close", None)
        if close is not None:
            close()

    def _run(self) -> Iterator[str]:
        stops = tuple(s for s in self._params.stop if s)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        cut: int | None = None
        try:
            for token in self._token_ids:
                self.completion_tokens += 1
                pending += decoder.decode(self._token_bytes(token))
                cut = find_stop(pending, stops)
                if cut is not None:
                    self.finish_reason = FINISH_STOP
                    break
                if self.completion_tokens >= self._params.max_tokens:
                    self.finish_reason = FINISH_LENGTH
                    break
                ready = len(pending) - stop_prefix_length(pending, stops)
                if ready > 0:
                    yield pending[:ready]
                    pending = pending[ready:]
            else:
                self.finish_reason = FINISH_STOP  # end-of-sequence
        finally:
            # Free the model before the last piece: the consumer may never
            # ask for the end of the iteration once it has seen the text.
            self._close_token_ids()
        if cut is None:
            pending += decoder.decode(b"", final=True)
            cut = find_stop(pending, stops)
            if cut is not None:
                self.finish_reason = FINISH_STOP
        if cut is not None:
            pending = pending[:cut]
        if pending:
            yield pending


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop sequence starts in ``text``, if any."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop.

    That tail must be held back while streaming: the next token may complete
    the stop sequence, and a stop sequence must never reach the client.
    """
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def check_model_file(path: Path) -> None:
    """Raise :class:`BackendError` unless ``path`` is a loadable-looking model file.

    Why: the C loaders memory-map the file and trust it. A missing path makes
    ctransformers look it up on the Hugging Face hub, and a truncated GGUF
    (an interrupted copy) loads "fine" and then reads past the end of the
    map. For GGUF files (versions 1 to 3; any other is refused) this walks
    the header and tensor table (cheap, no tensor data is read) and checks
    every tensor lies inside the file.
    Other formats (old GGML files) are left to the backend.
    """
    if not path.exists():
        raise BackendError(f"model file {path} does not exist")
    if not path.is_file():
        raise BackendError(f"model path {path} is not a file")
    try:
        if file_magic(path) == GGUF_MAGIC:
            check_gguf_extent(path)
    except OSError as exc:
        raise BackendError(f"model file {path} cannot be read: {exc}") from None
    except UnsupportedGgufVersion as exc:
        # Not left to the backend: ctransformers reads any version as v2 and, given random bytes, allocates
        # terabytes and crashes the worker (SIGSEGV); llama.cpp itself refuses all but v2 and v3.
        raise BackendError(f"model file {path} is not a GGUF file govgate can read ({exc.reason})") from None
    except ModelFileError as exc:
        raise BackendError(f"model file {path} is not a valid GGUF file ({exc.reason}); is it truncated?") from None
