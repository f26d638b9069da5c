"""The shapes of request and output the reload trial asks about (``gateway/requests/policy_trial.py``).

A rule can conflict or fail on one shape of request only: ``stream: true``,
the ``/v1/completions`` endpoint, a ``max_tokens`` above the trial's 16, or
an output window that is not the last one (a stream's). The trial asked one
shape (a chat request, ``stream: false``, ``max_tokens`` 16, one final
output window), and each of those revisions was loaded and then answered
``policy_error`` to every live request of the other shape (probe p3 F6).
So each (role, team, model) the trial picks is asked in every shape here:
each shape on its own, not their products, which keeps a reload's cost a
small multiple of the combinations (about 60 ms on the shipped policy with two evaluators,
0.17 s on OPA).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.requests.schemas import CHAT, COMPLETIONS
from workers.contract.registry import ModelSpec

#: What each trial request asks (a chat request's messages; a completion's prompt is their text).
TRIAL_MESSAGES = [{"role": "user", "content": "hello"}]
#: The completion bound most trial requests give.
TRIAL_MAX_TOKENS = 16
#: The output each output trial judges: whole as a final window, or cut in two as a stream's windows.
TRIAL_OUTPUT = "Hello! How can I help you today?"
#: Where a stream's trial output is cut: its first window (not final), then the rest (final).
_STREAM_CUT = len(TRIAL_OUTPUT) // 2


@dataclass(frozen=True)
class RequestShape:
    """One way a request reaches the policy: endpoint, streaming, and whether it asks the model's whole context."""

    endpoint: str
    stream: bool = False
    whole_context: bool = False  # max_tokens: the model's context length (else TRIAL_MAX_TOKENS)

    def max_tokens(self, model: ModelSpec) -> int:
        """The completion bound this shape asks of ``model``: 16, or the most a request can use on it."""
        return max(model.context_length, TRIAL_MAX_TOKENS + 1) if self.whole_context else TRIAL_MAX_TOKENS

    def describe(self, model: ModelSpec) -> str:
        """How the log names the shape: what a client would have sent."""
        path = "/v1/completions" if self.endpoint == COMPLETIONS else "/v1/chat/completions"
        return f"{path}, stream: {str(self.stream).lower()}, max_tokens {self.max_tokens(model)}"


#: Every shape asked of each (role, team, model): the first is the one whose decision the other trials reuse.
REQUEST_SHAPES = (
    RequestShape(CHAT),
    RequestShape(CHAT, stream=True),
    RequestShape(COMPLETIONS),
    RequestShape(CHAT, whole_context=True),
)


@dataclass(frozen=True)
class OutputWindow:
    """One window of the trial output as the output rule sees it, and the request shape it belongs to."""

    shape: RequestShape
    text: str
    offset: int
    final: bool

    def describe(self, model: ModelSpec) -> str:
        which = "a final window" if self.final else "a non-final window"
        return f"{self.shape.describe(model)}, {which} at offset {self.offset}"


#: The windows each output trial judges: a plain completion's one final window on either endpoint, and a
#: stream's windows (the first not final, as every window before a stream's end is).
OUTPUT_WINDOWS = (
    OutputWindow(REQUEST_SHAPES[0], TRIAL_OUTPUT, 0, True),
    OutputWindow(REQUEST_SHAPES[1], TRIAL_OUTPUT[:_STREAM_CUT], 0, False),
    OutputWindow(REQUEST_SHAPES[1], TRIAL_OUTPUT[_STREAM_CUT:], _STREAM_CUT, True),
    OutputWindow(REQUEST_SHAPES[2], TRIAL_OUTPUT, 0, True),
)
