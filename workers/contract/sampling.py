"""How a completion is sampled: one typed value from the gateway to the backends.

The gateway fills every default once, when it admits a request (the model's
registry default for ``repetition_penalty``, the policy's clamp for
``max_tokens``), so the job, its audit entry and the backend all see the
same effective values. Checked here so every backend rejects the same
nonsense.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace
from typing import Any, Final


@dataclass(frozen=True)
class SamplingParams:
    """The sampling settings of one generation, every field filled."""

    #: Most tokens to generate: the request's ``max_tokens`` after the policy's clamp.
    max_tokens: int
    #: Softmax temperature; 0 means greedy (always the likeliest token).
    temperature: float = 1.0
    #: Nucleus sampling: keep the likeliest tokens whose probabilities add up to this.
    top_p: float = 1.0
    #: Keep only this many likeliest tokens; 0 or less means the whole vocabulary.
    top_k: int = 40
    #: Texts that end the generation (never sent to the client).
    stop: tuple[str, ...] = ()
    #: Random seed, 0 to 2^31 - 1 (:func:`model_seed` brings a client's into that range); negative means a
    #: fresh random seed for every generation (the gateway sends -1 only when the client gave no seed).
    seed: int = -1
    #: Multiplies down the odds of tokens already generated (1.0: none). The
    #: gateway fills in the model's registry default when a request gives none.
    repetition_penalty: float = 1.0
    #: OpenAI's penalty growing with how often a token already appeared (0: none); only backends
    #: listing it in registry.BACKEND_FEATURES honour it (the gateway refuses it for the others).
    frequency_penalty: float = 0.0
    #: OpenAI's penalty on any token that already appeared (0: none); same backends as above.
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must not be negative")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive")
        if isinstance(self.stop, str):  # a lone string would be split into characters
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):  # a JSON list, read back from a payload
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_stops(self, extra: tuple[str, ...]) -> "SamplingParams":
        """These settings with more stop sequences (those a prompt format implies)."""
        return replace(self, stop=self.stop + extra) if extra else self

    def to_payload(self) -> dict[str, Any]:
        """A JSON object (the stop sequences as a list).

        Field by field rather than ``dataclasses.asdict``, which deep-copies
        recursively and was a visible part of the gateway's CPU per request.
        """
        payload = {name: getattr(self, name) for name in _FIELDS}
        payload["stop"] = list(self.stop)
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "SamplingParams":
        return cls(**payload)


#: The fields of :class:`SamplingParams`, in order (its payload's keys).
_FIELDS = tuple(field.name for field in fields(SamplingParams))


#: Seeds the backends take as they are (llama.cpp's and ctransformers' samplers read 31 bits).
SEED_RANGE: Final = 2**31


def model_seed(seed: int) -> int:
    """A client's ``seed`` (any signed 64-bit integer) as the seed the model runs with, reproducibly.

    Seeds from 0 to 2^31 - 1 are kept, so a seed gives what it gives on the
    backend called directly. Any other one, a negative seed too, is mapped
    through a hash into that range: the same seed always samples the same
    text (it was ``seed % 2**31``, so 2^31 + 7 sampled as 7, and a negative
    seed sampled at random, though OpenAI's ``seed`` exists to repeat a run).
    Two seeds out of the range may still meet, as any 64 bits must in 31.
    """
    if 0 <= seed < SEED_RANGE:
        return seed
    digest = hashlib.blake2b(seed.to_bytes(8, "big", signed=True), digest_size=8, person=b"govgate-seed").digest()
    return int.from_bytes(digest, "big") % SEED_RANGE

