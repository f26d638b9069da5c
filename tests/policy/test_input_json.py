"""The policy input's JSON (``gateway.policy.engine.input_json``) is the document ``json.dumps`` made, or its error.

msgspec writes it for a third of the CPU; these hold it to the old encoder on ugly inputs: what an evaluator
reads back is the same values of the same types, and what the old encoder refused is refused with the same
error (the deny's reason quotes it)."""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import math
from typing import Any

import pytest

from gateway.policy import engine
from gateway.policy.engine import input_json
from tests.json_sameness import same_json


def _old(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Tag(str, enum.Enum):
    A = "a"


def _input(**extra: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "principal": {"id": "alice", "team": None, "roles": ["user"], "key_id": "0123456789ab"},
        "request": {"endpoint": "chat", "model": "tiny", "text": "hi", "normalized_text": "hi", "max_tokens": 16,
                    "stream": False, "purpose": None, "messages": [{"role": "user", "content": "hi"}]},
        "model": {"name": "tiny", "family": "llama", "context_length": 512, "tags": []},
        "time": {"now_ns": 1764646000123456789, "hour_utc": 3, "weekday": "Wednesday"},
    }
    document.update(extra)
    return document


READ_BACK_THE_SAME = [
    _input(),
    _input(text="é ü 中文 \U0001F600 \u2028\u2029 \u200b\u202e \x00\x01\x1f\x7f \" \\ / \t\n\r"),
    _input(numbers=[0, -1, 2**53 + 1, 2**63, -2**63 - 1, 2**64, 2**70, -2**70, 10**40]),
    _input(floats=[0.1, 1.0, -0.0, 1e16, 1e-7, 1.5e300, 5e-324, 1.7976931348623157e308, 123456789.123, 2.5e-5]),
    _input(flags=[True, False, None, 1, 0, 1.0]),
    _input(nested={"a": [[[{"b": []}]]], "": {}, "k" * 300: "v"}),
    _input(pair=(1, "two")),  # a tuple reads back as a list from both
    {1: "one", 2.5: "x", "3": 3},  # keys that are not strings: json.dumps writes them as strings
    {1: "int key", "1": "str key"},  # two keys with one spelling: json.dumps writes both
    {True: "t", None: "n"},
    _input(level=Level.HIGH, tag=Tag.A),
    [],
    "a lone string",
]


@pytest.mark.parametrize("value", READ_BACK_THE_SAME, ids=range(len(READ_BACK_THE_SAME)))
def test_it_reads_back_as_the_old_encoders_text(value):
    new = input_json(value)
    assert new.decode("utf-8")  # valid UTF-8
    assert same_json(json.loads(new), json.loads(_old(value)))


REFUSED = [
    _input(score=math.nan),
    _input(scores=[1.0, math.inf]),
    _input(scores={"low": -math.inf}),
    _input(text="\ud800 alone"),
    _input(text="x\udfff"),
    _input(when=datetime.datetime(2026, 12, 2, tzinfo=datetime.timezone.utc)),
    _input(roles={"user"}),
    _input(amount=decimal.Decimal("1.5")),
    _input(colour=Colour.RED),
    _input(raw=b"bytes"),
    {("a", "b"): 1},
    {1: "one", "2": "two"} | {object(): 3},
]


@pytest.mark.parametrize("value", REFUSED, ids=range(len(REFUSED)))
def test_what_the_old_encoder_refused_is_refused_with_its_error(value):
    with pytest.raises((TypeError, ValueError)) as old:
        _old(value)
    with pytest.raises(type(old.value)) as new:
        input_json(value)
    assert str(new.value) == str(old.value)


def test_a_request_input_is_encoded_without_json_dumps(monkeypatch):
    """The shipped kind of input takes the fast way (json.dumps only for what it must judge)."""
    def refuse(*args, **kwargs):
        raise AssertionError("json.dumps called")

    monkeypatch.setattr(engine.json, "dumps", refuse)
    value = _input(usage={"principal": {"in_flight": 1, "tokens_today": 10}, "team": {"in_flight": 1}})
    assert json.loads(input_json(value)) == value
