"""The policy bench's output part: what the output rules add per stream window and per completion.

The gateway asks ``data.govgate.output_decision`` once per completion (the
whole output, one final window) and, streamed, once per window of about
1.5 × ``GOVGATE_OUTPUT_HOLDBACK_CHARS`` characters (a window is judged every
half hold-back of new text). Each figure here is one such evaluation on an
engine as the gateway runs it, on the input
:func:`gateway.requests.output_input.output_policy_input` builds from an
allowed request of the bench's mix: plain generated text, and the same text
with a finding the shipped rules redact (an IBAN) or stop on (a card number).
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any, Callable

from bench.policy_inputs import Sample
from bench.policy_timing import Operation, Run, timed

#: Words of the tiny model's kind of output, cycled into text of any length.
WORDS = ("grow us city thought have low in he than only night cross on hand men word hard did near and country "
         "know good call under earth your day build act still self their other when more very think").split()
#: A completion of the bench's kind: 256 tokens of about four characters.
COMPLETION_CHARS = 1024
FINDINGS = {"iban": "DE89 3704 0044 0532 0130 00", "card": "4111 1111 1111 1111"}


def text_of(chars: int, finding: str | None = None, start: int = 0) -> str:
    """``chars`` characters of words (from word ``start``), ``finding`` in the middle when given."""
    words = itertools.islice(itertools.cycle(WORDS), start, None)
    text = ""
    while len(text) < chars:
        text += " " + next(words)
    text = text[:chars]
    if finding is None:
        return text
    middle = (chars - len(finding) - 2) // 2
    return text[:middle] + " " + finding + " " + text[middle + len(finding) + 2:]


def output_inputs(samples: list[Sample], holdback_chars: int) -> dict[str, list[dict[str, Any]]]:
    """Inputs per kind of evaluation: windows and completions, plain and with findings."""
    from gateway.requests.output_input import output_policy_input

    request = next(sample.input for sample in samples if sample.expect_allow)
    obligations = {"max_tokens": 256, "prompt_logging": "full"}
    window = holdback_chars + holdback_chars // 2

    def windows(finding: str | None) -> list[dict[str, Any]]:
        return [output_policy_input(request, obligations, text_of(window, finding, start),
                                    offset=start * window, final=False) for start in range(8)]

    def completions(finding: str | None) -> list[dict[str, Any]]:
        return [output_policy_input(request, obligations, text_of(COMPLETION_CHARS, finding, start))
                for start in range(8)]

    return {"window": windows(None), "window_iban": windows(FINDINGS["iban"]),
            "window_card": windows(FINDINGS["card"]), "completion": completions(None),
            "completion_iban": completions(FINDINGS["iban"])}


def output_operation(engine: Any, inputs: list[dict[str, Any]]) -> Operation:
    """One output decision; an answer the engine could not give (unavailable, policy error) is a failure."""
    from gateway.policy import POLICY_ERROR, POLICY_UNAVAILABLE

    broken = {POLICY_ERROR, POLICY_UNAVAILABLE}

    async def operation(number: int) -> str | None:
        decision = await engine.decide_output(inputs[number % len(inputs)])
        for reason in decision.reasons:
            if reason.code in broken:
                return reason.code
        return None

    return operation


async def bench_outputs(engines: dict[str, Any], samples: list[Sample], args: argparse.Namespace,
                        say: Callable[[str], None]) -> dict[str, Any]:
    """Each kind of output evaluation on each engine, one at a time (as one stream asks), with its CPU."""
    inputs = output_inputs(samples, args.holdback)
    figures: dict[str, Any] = {"holdback_chars": args.holdback,
                               "window_chars": args.holdback + args.holdback // 2,
                               "completion_chars": COMPLETION_CHARS, "engines": {}}
    for name, engine in engines.items():
        say(f"outputs: {name}: {args.warmup} warm-up + {args.output_decisions} decisions per kind "
            f"({', '.join(inputs)})")
        runs: dict[str, Any] = {}
        for kind, kind_inputs in inputs.items():
            operation = output_operation(engine, kind_inputs)
            await timed(operation, args.warmup, 1)
            started = time.process_time()
            run: Run = await timed(operation, args.output_decisions, 1)
            gateway_us = (time.process_time() - started) / args.output_decisions * 1e6
            first = await engine.decide_output(kind_inputs[0])
            runs[kind] = {**run.figures(), "gateway_cpu_us": round(gateway_us, 1),
                          "outcome": "stop" if not first.allow else ("redact" if first.redact else "allow")}
        figures["engines"][name] = runs
    return figures


def print_outputs(figures: dict[str, Any]) -> None:
    print(f"\noutput decisions, one at a time (window {figures['window_chars']} chars = 1.5 x hold-back "
          f"{figures['holdback_chars']}; completion {figures['completion_chars']} chars):")
    print(f"  {'engine':<9} {'kind':<16} {'outcome':<8} {'p50 us':>9} {'p99 us':>9} {'gw CPU us':>10}  failures")
    for engine, runs in figures["engines"].items():
        for kind, run in runs.items():
            print(f"  {engine:<9} {kind:<16} {run['outcome']:<8} {run['p50_us']!s:>9} {run['p99_us']!s:>9} "
                  f"{run['gateway_cpu_us']!s:>10}  {run['failures'] or ''}")
    window = figures["engines"].get("embedded", {}).get("window")
    if window and window.get("p50_us"):
        per_token = window["p50_us"] / (figures["holdback_chars"] / 2 / 4)
        print(f"  streamed: one window per {figures['holdback_chars'] // 2} new characters (~"
              f"{figures['holdback_chars'] // 8} tokens): ~{per_token:.0f} us of judgement per token (embedded p50), "
              f"besides the hold-back itself ({figures['holdback_chars']} chars ~ {figures['holdback_chars'] // 4} "
              "tokens of delay)")
