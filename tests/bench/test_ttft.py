"""``bench/ttft.py``: a short real run gives every side's first-token figures and their differences.

The SSE reading is the part most likely to go wrong silently (a first
token never found reads as "no_text", a connection left mid-stream breaks
the next request), so the run must see every request succeed. No test
here looks at a timing's value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.ttft import parse_args, run


@pytest.mark.timeout(120)
def test_a_short_real_run_finds_the_first_token_on_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "ttft.json"
    document = run(parse_args(["--requests", "4", "--json", str(out)]))
    assert document is not None
    assert json.loads(out.read_text()) == document
    for side in ("gateway", "gateway_rules_off"):
        assert document[side]["outcomes"] == {"200": 4}, side
        assert document[side]["samples"] == 4, side
    assert document["direct"]["samples"] == 4
    assert document["over_direct_p50_ms"] is not None
    assert document["over_direct_p50_ms_rules_off"] is not None
    assert document["holdback_chars"] > 0
