"""Checks that a request can run on its model at all, made before it is queued."""

from __future__ import annotations

from gateway.api.schemas import ChatCompletionRequest, CompletionRequest
from gateway.errors import ApiError
from workers.registry import BACKEND_FEATURES, ModelSpec


#: No tokenizer in use encodes more than this many bytes in one token, so a
#: prompt of N bytes is at least N / this many tokens. The gateway holds no
#: tokenizer (models live in workers); this bound lets it refuse a prompt that
#: cannot possibly fit before queueing it, and the worker checks the exact
#: count before it generates.
MAX_BYTES_PER_TOKEN = 64


def check_fits(request: ChatCompletionRequest | CompletionRequest, spec: ModelSpec) -> None:
    """Refuse parameters the model's backend would ignore, and prompts that cannot fit its context."""
    features = BACKEND_FEATURES.get(spec.backend, frozenset())
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) != 0.0 and name not in features:
            raise ApiError(400, "unsupported_parameter",
                           f"Model '{spec.name}' ({spec.backend}) does not support '{name}'; "
                           "use 'repetition_penalty' instead.", param=name)
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
