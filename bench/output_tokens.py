"""Tokens per second through the gateway with the output rules on, against the model called directly.

``bench/policy.py --tokens`` runs it: a private stack (Redis, one tiny-model
worker, the API on the shipped policy, whose output rules judge every
completion and, streamed, every window of the hold-back) and the same model
loaded in this process, taking turns (``bench/inference.py`` says why they
never overlap). Three figures per request, each the best and the median of
``--token-requests``:

* **whole**: a non-streamed completion, send to answer (one judgement of the whole output);
* **streamed**: a streamed one, send to ``[DONE]`` (a judgement per window and one of the tail);
* **direct**: ``generate`` in this process with the parameters the worker builds.

The goal is gateway ≥ 95 % of direct; the ratio is printed, never asserted.
Tokens are the responses' ``usage`` and ``Generation.completion_tokens``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Callable

from bench._figures import percentile, rounded
from bench.inference import COMPLETIONS_PATH, REQUEST_TIMEOUT_S, measure_direct, post_completion, request_body
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


async def _gateway(base_url: str, headers: dict[str, str], body: dict[str, Any],
                   requests: int) -> tuple[list[Sample], list[Sample]]:
    import httpx

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
        await post_completion(client, body)  # the first request pays for lazy set-up
        await stream_whole(client, body)
        whole = [await post_completion(client, body) for _ in range(requests)]
        streamed = [await stream_whole(client, body) for _ in range(requests)]
    return whole, streamed


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
                   say: Callable[[str], None]) -> dict[str, Any]:
    """Start the stack, measure through it, stop it, measure directly; the figures and ratios."""
    from bench._stack import start_govgate
    from govgate.model_files import ensure_models
    from workers.contract.registry import Registry, default_registry

    spec = default_registry(var_dir).models[MODEL]
    ensure_models(Registry({MODEL: spec}), say)

    say(f"tokens: stack with the tiny model, output rules on (hold-back {holdback_chars} chars); "
        f"{requests} whole + {requests} streamed requests of {max_tokens} tokens …")
    running = start_govgate(var_dir, [MODEL], note="bench/policy.py --tokens", request_timeout_s=REQUEST_TIMEOUT_S,
                            output_holdback_chars=holdback_chars)
    try:
        whole, streamed = asyncio.run(_gateway(running.base_url, running.headers, request_body(MODEL, max_tokens),
                                               requests))
    finally:
        running.stop()
    say(f"tokens: direct, {requests} generations in this process …")
    direct = measure_direct(spec, max_tokens, requests)
    figures = {"whole": _rates(whole), "streamed": _rates(streamed), "direct": _rates(direct.sequential)}
    figures["ratios"] = {f"{side}_{key}": _ratio(figures[side], figures["direct"], key)
                         for side in ("whole", "streamed") for key in ("best", "p50")}
    figures.update(max_tokens=max_tokens, holdback_chars=holdback_chars)
    return figures


def print_tokens(figures: dict[str, Any]) -> None:
    ratios = figures["ratios"]
    print(f"\ntokens/s, tiny model, {figures['max_tokens']} tokens, output rules on "
          f"(hold-back {figures['holdback_chars']} chars); best / p50 of {figures['direct']['requests']}:")
    for side in ("whole", "streamed", "direct"):
        row = figures[side]
        extra = ""
        if side != "direct":
            extra = f"   vs direct: best {ratios[f'{side}_best']}, p50 {ratios[f'{side}_p50']}  (goal >= 0.95)"
        failed = f"  failed: {row['failed']}" if row.get("failed") else ""
        print(f"  {side:<9} {row['best']!s:>9} {row['p50']!s:>9}{extra}{failed}")
