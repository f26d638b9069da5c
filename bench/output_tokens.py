"""Tokens per second through the gateway with the output rules on, against the model called directly.

``bench/policy.py --tokens`` runs it: a private stack (Redis, one tiny-model
worker, the API on the shipped policy, whose output rules judge every
completion and, streamed, every window of the hold-back) and the same model
loaded in this process, and beside it the same stack with
``GOVGATE_OUTPUT_RULES=0``, the baseline that tells what the rules cost from
what the gateway costs. The sides take turns, request by request, round
after round, so they meet the same noise of a busy machine (they never
overlap: ``bench/inference.py`` says why). Figures per request, each the
best and the median of ``--token-requests`` rounds:

* **whole**: a non-streamed completion, send to answer (one judgement of the whole output);
* **streamed**: a streamed one, send to ``[DONE]`` (a judgement per window and one of the tail);
* the same two with the rules off;
* **direct**: ``generate`` in this process with the parameters the worker builds.

The goal is gateway with the rules ≥ 95 % of direct; the ratios (against
direct, and rules on against off) are printed, never asserted.
Tokens are the responses' ``usage`` and ``Generation.completion_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from bench._figures import percentile, rounded
from bench.inference import COMPLETIONS_PATH, PROMPT, REQUEST_TIMEOUT_S, post_completion, request_body
from bench.inference_report import Sample

#: The tiny model's name in the default registry.
MODEL = "govgate-tiny"


async def stream_whole(client: Any, body: dict[str, Any]) -> Sample:
    """One streamed request read to ``[DONE]``: its time, and its tokens from the usage chunk."""
    started = time.perf_counter()
    tokens = 0
    async with client.stream("POST", COMPLETIONS_PATH, json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as response:
        if response.status_code != 200:
            await response.aread()
            return Sample(status=str(response.status_code))
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return Sample(status=f"stream:{event['error'].get('code')}")
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    return Sample(status="200", seconds=time.perf_counter() - started, tokens=tokens)


async def _rounds(stacks: dict[str, Any], model: Any, body: dict[str, Any],
                  requests: int) -> dict[str, list[Sample]]:
    """Round after round, one request of each kind on each side, so that every side meets the same noise."""
    import httpx

    from bench.inference import direct_params, timed_generate

    params = direct_params(model, body["max_tokens"])
    samples: dict[str, list[Sample]] = {key: [] for key in
                                        ("whole", "whole_off", "streamed", "streamed_off", "direct")}
    async with contextlib.AsyncExitStack() as exits:
        clients = {name: await exits.enter_async_context(httpx.AsyncClient(
            base_url=running.base_url, headers=running.headers, timeout=REQUEST_TIMEOUT_S))
            for name, running in stacks.items()}
        for client in clients.values():  # the first requests pay for lazy set-up
            await post_completion(client, body)
            await stream_whole(client, body)
        model.generate(PROMPT, params)
        for _ in range(requests):
            for name, client in clients.items():
                suffix = "" if name == "on" else "_off"
                samples[f"whole{suffix}"].append(await post_completion(client, body))
                samples[f"streamed{suffix}"].append(await stream_whole(client, body))
            samples["direct"].append(timed_generate(model, params))
    return samples


def _rates(samples: list[Sample]) -> dict[str, Any]:
    """Tokens/s of each successful request: best and median; the statuses of the others."""
    rates = [s.tokens / s.seconds for s in samples if s.ok and s.seconds > 0]
    failed = [s.status for s in samples if not s.ok]
    return {"best": rounded(max(rates), 1) if rates else None, "p50": rounded(percentile(rates, 50), 1),
            "requests": len(samples), **({"failed": failed} if failed else {})}


def _ratio(gateway: dict[str, Any], direct: dict[str, Any], key: str) -> float | None:
    if gateway.get(key) is None or not direct.get(key):
        return None
    return round(gateway[key] / direct[key], 3)


def measure_tokens(var_dir: Path, requests: int, max_tokens: int, holdback_chars: int,
                   say: Callable[[str], None], model_name: str = MODEL) -> dict[str, Any]:
    """Start the stack, measure through it, stop it, measure directly; the figures and ratios.

    ``model_name`` is a model of the default registry: the tiny model (the
    gateway's fixed cost weighs most against its thousands of tokens a second)
    or ``gemma-3-270m`` (a real model's pace, where the goal is meant).
    """
    from bench._stack import start_govgate
    from govgate.model_files import ensure_models
    from workers.contract.registry import Registry, default_registry

    for sub in ("on", "off"):
        (var_dir / sub).mkdir()
    spec = default_registry(var_dir / "on").models[model_name]
    ensure_models(Registry({model_name: spec}), say)

    from workers.backends import load_model

    stacks: dict[str, Any] = {}
    try:
        for name in ("on", "off"):
            say(f"tokens: stack with {model_name}, output rules {name} (hold-back {holdback_chars} chars) …")
            stacks[name] = start_govgate(var_dir / name, [model_name], note="bench/policy.py --tokens",
                                         request_timeout_s=REQUEST_TIMEOUT_S, output_holdback_chars=holdback_chars,
                                         output_rules=name == "on")
        model = load_model(spec)  # after every child was started (bench/inference.py says why)
        say(f"tokens: {requests} rounds of: whole and streamed on each stack ({max_tokens} tokens), one direct "
            "generation …")
        samples = asyncio.run(_rounds(stacks, model, request_body(model_name, max_tokens), requests))
    finally:
        for running in stacks.values():
            running.stop()
    figures: dict[str, Any] = {key: _rates(value) for key, value in samples.items()}
    figures["ratios"] = {f"{side}_{key}": _ratio(figures[side], figures[base], key)
                         for side, base in (("whole", "direct"), ("streamed", "direct"), ("whole_off", "direct"),
                                            ("streamed_off", "direct"))
                         for key in ("best", "p50")}
    figures["ratios"].update({f"{side}_on_vs_off_{key}": _ratio(figures[side], figures[f"{side}_off"], key)
                              for side in ("whole", "streamed") for key in ("best", "p50")})
    figures.update(max_tokens=max_tokens, holdback_chars=holdback_chars, model=model_name)
    return figures


def print_tokens(figures: dict[str, Any]) -> None:
    ratios = figures["ratios"]
    print(f"\ntokens/s, {figures.get('model', MODEL)}, {figures['max_tokens']} tokens (hold-back {figures['holdback_chars']} chars); "
          f"best / p50 of {figures['direct']['requests']} requests; ratios best / p50 (goal: rules on >= 0.95 "
          "of direct):")
    print(f"  {'':<20} {'best':>9} {'p50':>9}   {'vs direct':>13}   {'on vs off':>13}")
    for side in ("whole", "streamed", "whole_off", "streamed_off", "direct"):
        row = figures[side]
        direct = "" if side == "direct" else f"{ratios[f'{side}_best']!s:>6} {ratios[f'{side}_p50']!s:>6}"
        on_off = f"{ratios[f'{side}_on_vs_off_best']!s:>6} {ratios[f'{side}_on_vs_off_p50']!s:>6}" \
            if side in ("whole", "streamed") else ""
        failed = f"  failed: {row['failed']}" if row.get("failed") else ""
        label = side.replace("_off", " (rules off)")
        print(f"  {label:<20} {row['best']!s:>9} {row['p50']!s:>9}   {direct:>13}   {on_off:>13}{failed}")
