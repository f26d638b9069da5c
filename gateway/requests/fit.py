"""Checks that a request can run on its model at all, made before it is queued.

The prompt's length is checked at the door against a bound that needs no
tokenizer (``MAX_BYTES_PER_TOKEN``), then, once the policy has set
``max_tokens``, with the model's own tokenizer if the gateway can read the
model file (else the worker refuses before generating). See
docs/architecture.md, section "The request path", steps 3 and 7.
"""

from __future__ import annotations

import logging
import time

import anyio

from gateway.requests.schemas import ChatCompletionRequest, CompletionRequest
from gateway.api_errors import ApiError
from workers.contract.prompts import render_chat
from workers.contract.registry import BACKEND_FEATURES, BACKEND_REFUSED_CHARACTERS, ModelSpec
from workers.contract.tokenizers import Tokenizer, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

#: No tokenizer in use encodes more than this many bytes in one token, so a
#: prompt of N bytes is at least N / this many tokens.
MAX_BYTES_PER_TOKEN = 64


#: How long a model whose file the gateway cannot read goes without a new look.
RETRY_MISSING_S = 30.0

#: Prompts up to this many characters are counted on the event loop: the
#: tokenizers are pure Python, so a thread saves no CPU, and handing a short
#: prompt to one costs more (~0.15 ms) than counting it. Longer prompts go
#: to a thread so that one big prompt cannot stall every other request.
INLINE_COUNT_CHARS = 2048


class PromptCounter:
    """The exact prompt token count of each model, from tokenizers loaded once per model.

    A model without a usable tokenizer here (its file is on the workers'
    machines only, or of a kind with no exact tokenizer) is remembered as such,
    so requests do not pay for a new look every time; a missing file is looked
    for again every ``RETRY_MISSING_S`` (a worker may still be writing it).
    """

    def __init__(self) -> None:
        self._tokenizers: dict[str, tuple[Tokenizer | None, float]] = {}
        self._lock = anyio.Lock()

    async def count(self, spec: ModelSpec, messages: list[dict[str, str]] | None, prompt: str | None) -> int | None:
        """Tokens the worker will feed the model for this prompt, or None if the gateway cannot tell."""
        tokenizer = await self._tokenizer(spec)
        if tokenizer is None:
            return None
        text = render_chat(messages, spec.prompt_format)[0] if messages is not None else (prompt or "")
        if len(text) <= INLINE_COUNT_CHARS:
            return tokenizer.count(text)
        return await anyio.to_thread.run_sync(tokenizer.count, text)

    async def _tokenizer(self, spec: ModelSpec) -> Tokenizer | None:
        cached = self._usable(spec)
        if cached is not None:
            return cached[0]
        async with self._lock:  # one load per model, however many requests arrive first
            cached = self._usable(spec)
            if cached is not None:
                return cached[0]
            try:
                tokenizer = await anyio.to_thread.run_sync(load_tokenizer, spec)
            except (TokenizerError, OSError) as exc:
                log.warning("no exact token counts for %s (%s); the worker will check", spec.name, exc)
                tokenizer = None
            retry_at = time.monotonic() + RETRY_MISSING_S if not spec.path.exists() else float("inf")
            self._tokenizers[spec.name] = (tokenizer, retry_at)
        return tokenizer

    def _usable(self, spec: ModelSpec) -> tuple[Tokenizer | None, float] | None:
        """The cached answer for ``spec`` unless it is a missing file due for another look."""
        cached = self._tokenizers.get(spec.name)
        if cached is not None and (cached[0] is not None or time.monotonic() < cached[1]):
            return cached
        return None


def check_fits(request: ChatCompletionRequest | CompletionRequest, spec: ModelSpec) -> None:
    """Refuse parameters the model's backend would ignore, and prompts that cannot fit its context."""
    features = BACKEND_FEATURES.get(spec.backend, frozenset())
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) != 0.0 and name not in features:
            raise ApiError(400, "unsupported_parameter",
                           f"Model '{spec.name}' ({spec.backend}) does not support '{name}'; "
                           "use 'repetition_penalty' instead.", param=name)
    _check_characters(request, spec)
    if isinstance(request, ChatCompletionRequest):
        size = sum(len(m.text().encode()) for m in request.messages)
    else:
        size = len((request.prompt if isinstance(request.prompt, str) else request.prompt[0]).encode())
    least_tokens = -(-size // MAX_BYTES_PER_TOKEN)
    if least_tokens >= spec.context_length:
        raise ApiError(400, "context_length_exceeded",
                       f"The prompt is at least {least_tokens} tokens; model '{spec.name}' has a context of "
                       f"{spec.context_length} tokens.", param="messages" if isinstance(
                           request, ChatCompletionRequest) else "prompt")


def _check_characters(request: ChatCompletionRequest | CompletionRequest, spec: ModelSpec) -> None:
    """Refuse prompt text holding a character the model's backend cannot take (a NUL for ctransformers).

    Why here: such a prompt would otherwise be admitted, queued and fail in
    the worker (a 502 for what is the caller's input).
    """
    refused = BACKEND_REFUSED_CHARACTERS.get(spec.backend, "")
    if not refused:
        return
    if isinstance(request, ChatCompletionRequest):
        texts = [(f"messages[{i}].content", m.text()) for i, m in enumerate(request.messages)]
    else:
        texts = [("prompt", request.prompt if isinstance(request.prompt, str) else request.prompt[0])]
    for param, text in texts:
        for char in refused:
            if char in text:
                raise ApiError(422, "invalid_value",
                               f"'{param}' contains the character U+{ord(char):04X}, which model '{spec.name}' "
                               f"({spec.backend}) cannot take; remove it.", param=param)
