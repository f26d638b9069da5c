"""Request shapes of the OpenAI-compatible endpoints, as msgspec structs.

Unknown fields are refused rather than ignored: a client that sends a
parameter govgate does not implement should hear so instead of getting a
silently different answer. See docs/architecture.md, section
"gateway/requests and gateway/dispatch".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

from workers.contract.sampling import SamplingParams, model_seed

#: The two endpoints, as the audit log, the policy input and the job name them.
CHAT = "chat.completions"
COMPLETIONS = "completions"

# Counts and seeds have upper bounds, so a value no backend could take (2^53,
# 10^24) is a 422 naming the parameter before the policy ever sees it.
#: Largest count a backend takes (its C API counts in 32-bit ints).
MAX_COUNT = 2**31 - 1
#: Largest ``n`` accepted as a value at all (anything but 1 is then refused as unsupported).
MAX_CHOICES = 128
#: Smallest repetition penalty: the smallest normal C ``float`` (FLT_MIN), what the backends take it as.
#: llama.cpp refuses a smaller one ("penalty_repeat must be finite and greater than 0": 1e-39 was, 1e-38
#: not), which was queued and failed in the worker as a 502 for what is the caller's input.
MIN_REPETITION_PENALTY = 1.1754943508222875e-38

Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
Choices = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, msgspec.Meta(ge=MIN_REPETITION_PENALTY, le=10.0)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
StopList = Annotated[list[NonEmptyStr], msgspec.Meta(max_length=4)]

# ``metadata`` is bounded as OpenAI bounds it. Beyond these, ``gateway.requests.parsing`` refuses it
# with 400 ``invalid_value`` before msgspec sees it (the constraints here are for the schema).
#: Most key-value pairs ``metadata`` may hold.
MAX_METADATA_PAIRS = 16
#: Longest key of ``metadata``, in characters (code points, not bytes).
MAX_METADATA_KEY_CHARS = 64
#: Longest value of ``metadata``, in characters.
MAX_METADATA_VALUE_CHARS = 512
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=MAX_METADATA_KEY_CHARS)],
         Annotated[str, msgspec.Meta(max_length=MAX_METADATA_VALUE_CHARS)]],
    msgspec.Meta(max_length=MAX_METADATA_PAIRS)]


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[TextPart], msgspec.Meta(min_length=1)]]
    name: str | None = None
    # Fields of an assistant message echoed back from an earlier response (null/empty only).
    refusal: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_dict(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for the system role.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = False
    #: OpenAI pads stream chunks against size side channels unless this is false; govgate never pads, so only
    #: null and false are accepted (checked in ``gateway.requests.parsing``): true is refused, not ignored.
    include_obfuscation: Any = None

    def __post_init__(self) -> None:
        if self.include_usage is None:  # OpenAI's null: the default
            self.include_usage = False


#: Nullable fields whose null stands for a default other than "none" (OpenAI's defaults).
_NULL_MEANS_DEFAULT: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "frequency_penalty": 0.0,
                                       "presence_penalty": 0.0, "stream": False, "n": 1}


class _Sampling(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Parameters both endpoints share."""

    model: NonEmptyStr
    max_tokens: Count | None = None
    # OpenAI's spec makes these nullable, null meaning the default, and clients that
    # write every parameter send null for one left unset: ``__post_init__`` fills the
    # default in, so the rest of the gateway sees the value it stands for.
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: Penalty | None = 0.0
    presence_penalty: Penalty | None = 0.0
    stop: Union[NonEmptyStr, StopList, None] = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Choices | None = 1
    user: str | None = None
    metadata: Metadata | None = None
    # OpenAI fields that clients and SDK wrappers send with their default value
    # (``"logprobs": false``, ``"response_format": {"type": "text"}``…): declared
    # as ``Any`` and accepted only with a value that asks for what govgate does
    # anyway (checked in ``gateway.requests.parsing``).
    logit_bias: Any = None
    service_tier: Any = None
    store: Any = None

    def __post_init__(self) -> None:
        for name, default in _NULL_MEANS_DEFAULT.items():
            if getattr(self, name) is None:
                setattr(self, name, default)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        """A stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self, default: int) -> int:
        """The completion length asked for, before the policy's clamp."""
        return self.max_tokens if self.max_tokens is not None else default

    @property
    def max_tokens_given(self) -> bool:
        """Whether the client bounded the completion itself (left out, OpenAI runs to the context's end)."""
        return self.requested_max_tokens(-1) != -1

    def sampling_params(self, max_tokens: int, model_repetition_penalty: float) -> SamplingParams:
        """The sampling settings to run with: ``max_tokens`` as decided, every left-out default filled in."""
        # left out (None): SamplingParams' default; a seed as the model runs with it (reproducible, any sign)
        optional = {"top_k": self.top_k, "seed": None if self.seed is None else model_seed(self.seed)}
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=tuple(self.stop_list()),
            repetition_penalty=model_repetition_penalty if self.repetition_penalty is None
            else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            **{name: value for name, value in optional.items() if value is not None})


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    prediction: Any = None
    audio: Any = None
    reasoning_effort: Any = None

    def requested_max_tokens(self, default: int) -> int:
        """``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().requested_max_tokens(default)

    def prompt_parts(self) -> tuple[list[dict[str, str]] | None, str | None]:
        """The prompt as policy, audit and job carry it: these messages, no single text."""
        return [m.as_dict() for m in self.messages], None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: Union[str, Annotated[list[str], msgspec.Meta(min_length=1)]]
    logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    def prompt_parts(self) -> tuple[list[dict[str, str]] | None, str | None]:
        """The prompt as policy, audit and job carry it: no messages, the one text."""
        return None, self.prompt if isinstance(self.prompt, str) else self.prompt[0]


#: The request shape of each endpoint.
REQUEST_SHAPES: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    CHAT: ChatCompletionRequest, COMPLETIONS: CompletionRequest}
