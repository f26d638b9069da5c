"""Request shapes of the OpenAI-compatible endpoints, as msgspec structs.

Unknown fields are refused rather than ignored: a client that sends a
parameter govgate does not implement (``logprobs``, ``tools``…) should hear
so instead of getting a silently different answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, msgspec.Meta(ge=0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0.0, le=10.0)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
StopList = Annotated[list[NonEmptyStr], msgspec.Meta(max_length=4)]


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[TextPart], msgspec.Meta(min_length=1)]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_dict(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for the system role.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _Sampling(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Parameters both endpoints share."""

    model: NonEmptyStr
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    stop: Union[NonEmptyStr, StopList, None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: PositiveInt = 1
    user: str | None = None
    metadata: dict[str, str] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: Union[str, Annotated[list[str], msgspec.Meta(min_length=1)]]
