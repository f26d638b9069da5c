"""What the inference bench measured (samples, runs per side) and how it is reported.

Tokens are counted from the responses' ``usage`` and from
``Generation.completion_tokens``, so both sides count the same thing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench._figures import percentile, ratio, rounded, table_row


@dataclass
class Sample:
    """One request or one direct call: how many tokens, how long, what text."""

    status: str
    seconds: float = 0.0
    tokens: int = 0
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "200"


@dataclass
class GatewayRun:
    """One model's figures through the gateway."""

    sequential: list[Sample]
    batch: list[Sample]
    batch_wall_s: float
    first_piece: list[Sample]  # ``seconds`` is the time to the first text piece


@dataclass
class DirectRun:
    """One model's figures from a backend call in this process."""

    load_s: float
    sequential: list[Sample]
    first_piece: list[Sample]


def tokens_per_s(samples: list[Sample], wall_s: float | None = None) -> float | None:
    """Completion tokens of the successful samples over their summed time (or ``wall_s``)."""
    good = [s for s in samples if s.ok]
    seconds = sum(s.seconds for s in good) if wall_s is None else wall_s
    return sum(s.tokens for s in good) / seconds if good and seconds > 0 else None


def p50_ms(samples: list[Sample]) -> float | None:
    """Nearest-rank median of the successful samples' time, in milliseconds."""
    median = percentile([s.seconds for s in samples if s.ok], 50)
    return None if median is None else median * 1000


def statuses(*groups: list[Sample]) -> Counter:
    return Counter(s.status for group in groups for s in group)


def model_figures(name: str, max_tokens: int, gateway: GatewayRun, direct: DirectRun) -> dict[str, Any]:
    """One model's figures and ratios; the table and the JSON line carry the same numbers."""
    gw_seq, gw_batch = tokens_per_s(gateway.sequential), tokens_per_s(gateway.batch, gateway.batch_wall_s)
    dr_seq = tokens_per_s(direct.sequential)
    gw_ttft, dr_ttft = p50_ms(gateway.first_piece), p50_ms(direct.first_piece)
    gw_texts = {s.text for s in gateway.sequential if s.ok}
    dr_texts = {s.text for s in direct.sequential if s.ok}
    gw_status = statuses(gateway.sequential, gateway.batch, gateway.first_piece)
    return {
        "model": name,
        "max_tokens": max_tokens,
        "gateway": {
            "tokens_per_s": rounded(gw_seq, 1),
            "batch_tokens_per_s": rounded(gw_batch, 1),
            "batch_size": len(gateway.batch),
            "request_p50_ms": rounded(p50_ms(gateway.sequential), 1),
            "ttft_p50_ms": rounded(gw_ttft, 1),
            "completion_tokens": [s.tokens for s in gateway.sequential if s.ok],
            "errors": sum(n for status, n in gw_status.items() if status != "200"),
            "statuses": dict(gw_status),
        },
        "direct": {
            "tokens_per_s": rounded(dr_seq, 1),
            "request_p50_ms": rounded(p50_ms(direct.sequential), 1),
            "ttft_p50_ms": rounded(dr_ttft, 1),
            "completion_tokens": [s.tokens for s in direct.sequential if s.ok],
            "load_s": round(direct.load_s, 2),
        },
        "ratios": {
            "tokens_per_s": ratio(gw_seq, dr_seq),
            "batch_tokens_per_s": ratio(gw_batch, dr_seq),
            "ttft": ratio(gw_ttft, dr_ttft),
        },
        # Greedy decoding on both sides: the same text shows both ran the same prompt and parameters.
        "same_output": bool(gw_texts) and gw_texts == dr_texts,
    }


_LABEL_WIDTH, _CELL_WIDTH = 26, 12
_COLUMNS = ("tok/s", "batch tok/s", "req p50 ms", "TTFT p50 ms", "tok/req", "errors")


def _row(label: str, cells: list[Any], suffix: str = "") -> str:
    return table_row(label, cells, (_LABEL_WIDTH, _CELL_WIDTH), suffix)


def _tokens_cell(counts: list[int]) -> str | None:
    """Tokens per request: one number when all agree (they should, greedy), else min-max."""
    if not counts:
        return None
    return str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def table(results: list[dict[str, Any]]) -> str:
    """Three rows per model: gateway, direct, and gateway / direct."""
    lines = [_row("", list(_COLUMNS))]
    for r in results:
        gw, dr, by = r["gateway"], r["direct"], r["ratios"]
        lines.append(_row(f"{r['model']} gateway", [gw["tokens_per_s"], gw["batch_tokens_per_s"],
                     gw["request_p50_ms"], gw["ttft_p50_ms"], _tokens_cell(gw["completion_tokens"]), gw["errors"]]))
        lines.append(_row(f"{r['model']} direct", [dr["tokens_per_s"], None, dr["request_p50_ms"],
                     dr["ttft_p50_ms"], _tokens_cell(dr["completion_tokens"]), None]))
        lines.append(_row("  gateway / direct", [by["tokens_per_s"], by["batch_tokens_per_s"], None,
                     by["ttft"], None, None], suffix="x"))
    return "\n".join(lines)


def notes(results: list[dict[str, Any]]) -> list[str]:
    """What a reader must know to trust the table: failures and output mismatches."""
    found = []
    for r in results:
        if r["gateway"]["errors"]:
            found.append(f"{r['model']}: non-200 outcomes {json.dumps(r['gateway']['statuses'], sort_keys=True)}")
        if not r["same_output"]:
            found.append(f"{r['model']}: gateway and direct greedy outputs differ (different prompt or parameters?)")
    return found
