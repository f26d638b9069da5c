"""An entry's body and payload are serialised by msgspec where that gives ``canonical_text``'s very text
(``audit/entry_args.py``, ``_quick_canonical``): the same bytes, so every chain hash and exported bundle is
unchanged, the same round-trip, and the same refusals.

The old way is spelled out here as it was, and every ugly body is held to it."""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import math
import random
import struct
import uuid
from typing import Any

import pytest

from audit import entry_args
from audit.chain import canonical_text
from audit.entry_args import normalise_body, normalise_payload
from audit.errors import InvalidEntryError
from tests.json_sameness import same_json


def old_normalise_body(body: Any, what: str = "body") -> tuple[str, Any]:
    """``normalise_body`` before msgspec: canonical_text, json.loads, and again from the round-trip if it differs."""
    if type(body) is not dict:
        body = dict(body)
    try:
        text = canonical_text(body)
        stored = json.loads(text)
        if stored != body:
            text = canonical_text(stored)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidEntryError(f"{what} is not plain JSON: {exc}") from exc
    return text, stored


def assert_as_before(body: dict) -> None:
    try:
        old = old_normalise_body(body)
    except InvalidEntryError as refused:
        with pytest.raises(InvalidEntryError) as new:
            normalise_body(body)
        assert str(new.value) == str(refused)
        return
    text, stored = normalise_body(body)
    assert text == old[0]
    assert same_json(stored, old[1])


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Tag(str, enum.Enum):
    A = "a"


class Ratio(float):
    pass


class Name(str):
    pass


UGLY = [
    {},
    {"b": 1, "a": 2, "A": 3, "": 4, "aa": 5, "a\x00": 6, "é": 7, "\uffff": 8, "\U00010000": 9, "\ue000": 10,
     "\U0010ffff": 11, "Z": 12, "\u00ff": 13},
    {"text": "é ü 中文 \U0001F600 \u2028\u2029 \u200b\u202e \x00\x01\x08\x0c\x1f\x7f \" \\ / \t\n\r <&>"},
    {"ints": [0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 2**70, -2**70, 10**40]},
    {"floats": [0.0, -0.0, 0.1, 1.0, 2.5, 1e15, 9999999999999998.0, 1e16, 1.5e300, 1.7976931348623157e308,
                1e-4, 9.999999999999999e-5, 1e-5, 1.5212603486793025e-05, 1e-7, 5e-324, 123456789.123, -33.701183]},
    {"params": {"temperature": 0.0, "top_p": 1.0, "top_k": 40, "seed": -1}, "timings": {"queue_ms": 33.701183}},
    {"flags": [True, False, None], "nested": {"z": {"y": [{"b": 1, "a": [[]]}]}}, "k" * 300: "v" * 3000},
    {"pair": (1, "two"), "inner": {"t": ()}},
    {"n": float("nan")},
    {"n": [float("inf")]},
    {"n": {"x": -math.inf}},
    {"s": "\ud800"},
    {"s": "x\udfff y"},
    {"\ud800": 1},
    {1: "int key", 2: "another"},
    {1: "int key", "1": "str key"},
    {"x": {2: "a", 10: "b"}},
    {"x": {True: 1, None: 2}},
    {"x": {1.5: "float key"}},
    {"when": datetime.datetime(2026, 12, 2, tzinfo=datetime.timezone.utc)},
    {"day": datetime.date(2026, 12, 2)},
    {"id": uuid.UUID(int=1)},
    {"roles": {"user"}},
    {"roles": frozenset({"user"})},
    {"amount": decimal.Decimal("1.5")},
    {"raw": b"bytes"},
    {"raw": bytearray(b"x")},
    {"colour": Colour.RED},
    {"level": Level.HIGH, "tag": Tag.A, Tag.A: "enum key"},
    {"ratio": Ratio(0.5), Name("name"): Name("value")},
    {"odd": object()},
]


@pytest.mark.parametrize("body", UGLY, ids=range(len(UGLY)))
def test_an_ugly_body_is_serialised_or_refused_as_before(body):
    assert_as_before(body)


def test_floats_of_every_magnitude_are_spelled_as_before():
    """One body per float, so a float msgspec spells like ``repr`` is held to it on the quick way (a body with
    one respelled float takes the slow way whole)."""
    rng = random.Random(9)
    floats = [struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0] for _ in range(10000)]
    floats += [m * 10.0 ** e for e in range(-330, 309) for m in (1, 1.5, 3, 9.999999999999999)]
    floats += [rng.uniform(-1e6, 1e6) for _ in range(3000)] + [round(rng.uniform(0, 1e3), 3) for _ in range(3000)]
    finite = [f for f in floats if math.isfinite(f)]
    quick = 0
    for f in finite:
        assert_as_before({"f": f, "l": [f, -f]})
        quick += entry_args._quick_canonical({"f": f}) is not None
    assert quick > len(finite) // 3  # the quick way was tried on many of them, not only the slow one


def test_every_character_is_escaped_or_kept_as_before():
    characters = [chr(c) for c in range(0x800)]  # every one below 0x800, then every seventh
    characters += [chr(c) for c in range(0x800, 0x110000, 7) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(characters), 2000):
        chunk = characters[start:start + 2000]
        body = {"s": "".join(chunk), "keys": {c: c for c in chunk}}
        assert entry_args._quick_canonical(body) is not None
        assert_as_before(body)


def test_the_payload_is_salted_and_digested_as_before():
    text, stored, digest = normalise_payload({"messages": [{"role": "user", "content": "Say hello \u00e9"}]})
    assert text == canonical_text(stored)
    assert set(stored) == {"messages", "salt"}
    assert len(stored["salt"]) == 32


def test_a_plain_body_takes_the_quick_way(monkeypatch):
    """An entry body the gateway writes is serialised without ``canonical_text`` (msgspec's text instead)."""
    def refuse(value: Any) -> str:
        raise AssertionError("canonical_text called")

    monkeypatch.setattr(entry_args, "canonical_text", refuse)
    body = {"endpoint": "chat.completions", "params": {"max_tokens": 1, "temperature": 0.0, "top_p": 1.0},
            "decision": {"allow": True, "reasons": [], "obligations": {"prompt_logging": "full"}},
            "timings": {"queue_ms": 33.701183}, "purpose": None, "roles": ["user"]}
    text, stored = normalise_body(body)
    assert stored == body
    monkeypatch.undo()
    assert text == canonical_text(body)


def test_threads_appending_at_once_get_each_their_own_text():
    """Entries are serialised on the append threads at once; the shared msgspec encoder and decoder (whose float
    check calls back into Python, where another thread may run) give each body its own text."""
    import concurrent.futures

    rng = random.Random(5)
    bodies = [{"n": i, "f": [rng.uniform(-1e3, 1e3) for _ in range(20)], "s": f"body {i} \u00e9",
               **({"tiny": rng.random() * 1e-6} if i % 3 == 0 else {})} for i in range(400)]  # a third the slow way
    assert sum(entry_args._quick_canonical(body) is not None for body in bodies) == 266
    expected = [old_normalise_body(body)[0] for body in bodies]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            assert list(pool.map(lambda body: normalise_body(body)[0], bodies)) == expected


@pytest.mark.parametrize("kind", ["object", "array"])
def test_a_body_nested_near_the_recursion_limit_is_kept_or_refused_as_before(kind):
    """msgspec nests a few levels deeper than ``json`` before its ``RecursionError``: a body just too deep for
    ``canonical_text`` was stored by the quick way, and its entry then could not be written again by
    ``canonical_text`` (an exported bundle's line, the bundle's check)."""
    import sys

    limit = sys.getrecursionlimit()
    for depth in range(limit - 200, limit + 10):
        value: Any = 1
        for _ in range(depth):
            value = {"a": value} if kind == "object" else [value]
        body = {"x": value}
        try:
            old = old_normalise_body(body)[0]
        except InvalidEntryError as refused:
            old = str(refused)
        try:
            new = normalise_body(body)[0]
        except InvalidEntryError as refused:
            new = str(refused)
        same = new == old  # the same text, or the same refusal (same_json would recurse too deep here)
        assert same, f"depth {depth}: {new[:60]!r}... where before {old[:60]!r}..."


def test_brackets_in_strings_do_not_count_as_nesting():
    """The depth check reads the text's structure only: prompts full of code keep the quick way."""
    def nested(depth: int) -> Any:
        value: Any = "]"
        for _ in range(depth):
            value = [value, {"k[": '"{\\\\"'}]
        return value

    assert entry_args._quick_canonical({"code": "{[(" * 500, "quoted": '\\"[[\\\\' * 300}) is not None
    # nested(d) in a body is d + 2 deep: the body, d arrays, the innermost object
    assert entry_args._quick_canonical({"x": nested(entry_args.QUICK_DEPTH - 2)}) is not None
    assert entry_args._quick_canonical({"x": nested(entry_args.QUICK_DEPTH - 1)}) is None
    assert_as_before({"x": nested(entry_args.QUICK_DEPTH - 1)})
