"""How fast do the built-in models generate, through govgate and without it?

Starts a private govgate stack (Redis, one worker per model, the API under
uvicorn) in a temporary folder, like ``bench/overhead.py``, and measures each
model two ways in the same run:

* **through the gateway**: ``POST /v1/completions`` with a raw prompt,
  ``temperature: 0`` and a fixed ``max_tokens``; a few sequential requests,
  then a small concurrent batch (the worker serves one at a time, so the
  batch shows what queueing costs), then streamed requests whose time to
  the first text piece is taken from the SSE lines;
* **directly**: ``load_model(spec)`` in this process, then ``generate`` and
  ``stream`` with the same prompt and the parameters the worker builds.

Tokens are counted from the responses' ``usage`` and from
``Generation.completion_tokens``, so both sides count the same thing. The
ratio gateway / direct is the figure to watch: absolute tokens/s move with
the machine, the ratio is what governance (HTTP, auth, policy, audit, queue,
result hand-back) costs a real generation. A raw prompt rather than chat
keeps the prompt identical on both paths without re-rendering a transcript.

Why the two sides take turns and never overlap: govgate targets two-core
machines and Gemma's llama.cpp backend uses two threads, so any overlap
would measure contention, not overhead. The direct models are loaded only
after every child has been started (a process must not fork after llama.cpp
has started its threads) and are freed after their own measurement.

Usage::

    .venv/bin/python bench/inference.py [--models tiny,gemma] [--requests 5] [--batch 4]
        [--max-tokens-gemma 64] [--max-tokens-tiny 256] [--skip-gemma] [--models-dir DIR]

Gemma's 253 MB file is assembled into the temporary folder on each run
unless ``--models-dir`` (default: the checkout's ``var/models`` when it
exists, where ``make up`` puts it) already holds it; that copy is only read.

The shipped policy limits every principal, admins included, to 120 requests
a minute and 8 in flight: the bench uses one admin key per model and keeps
``--batch`` at 8 or less, and a larger ``--requests`` may meet 429s, which
are reported, not hidden. Nothing here asserts a timing. Everything started
here is stopped at the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

if not __package__:  # run as `python bench/inference.py`: import the bench package from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._stack import ROOT, in_temp_dir, run_interruptible, say, start_govgate  # noqa: E402
from bench.inference_report import DirectRun, GatewayRun, Sample, model_figures, notes, table  # noqa: E402

COMPLETIONS_PATH = "/v1/completions"
#: One raw prompt for every request on both paths; a base model continues it.
PROMPT = "The history of the printing press begins in"
#: The longest one request may take (the batch's last request waits for the others).
REQUEST_TIMEOUT_S = 120.0
#: The longest one model's gateway phases may take; a stuck stack ends the run, not hangs it.
PHASE_TIMEOUT_S = 600.0
#: The shipped policy's ``in_flight`` limit per principal; a larger batch would only measure 429s.
MAX_BATCH = 8
#: Short names accepted by ``--models``.
ALIASES = {"tiny": "govgate-tiny", "gemma": "gemma-3-270m"}


# ---------------------------------------------------------------- registry


def bench_specs(names: list[str], var_dir: Path, models_dir: Path | None) -> list[Any]:
    """The default registry's specs for ``names``; Gemma's file reused from ``models_dir`` if there.

    Why reuse only an existing file: assembly is atomic, so a file under the
    model's name is complete; a missing one is assembled into the bench's own
    folder, never into the user's.
    """
    from dataclasses import replace

    from workers.contract.registry import DEFAULT_MODEL_NAME, default_registry

    registry = default_registry(var_dir)
    specs = []
    for name in names:
        spec = registry.models[name]
        if name == DEFAULT_MODEL_NAME and models_dir is not None and (models_dir / spec.path.name).is_file():
            spec = replace(spec, path=(models_dir / spec.path.name).resolve())
        specs.append(spec)
    return specs


def _toml_value(value: object) -> str:
    """A TOML literal for the field types a ModelSpec holds."""
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    raise TypeError(f"no TOML form for {type(value).__name__}")


def registry_toml(specs: list[Any]) -> str:
    """A registry file holding exactly ``specs``, so the workers load what the direct side loads."""
    lines: list[str] = []
    for spec in specs:
        lines.append(f"[models.{json.dumps(spec.name)}]")
        lines += [f"{f.name} = {_toml_value(getattr(spec, f.name))}" for f in fields(spec) if f.name != "name"]
        lines.append("")
    return "\n".join(lines)


def write_registry(specs: list[Any], var_dir: Path) -> list[Any]:
    """Write the registry file and read it back: the specs both sides use are the workers' own."""
    from workers.contract.registry import load_registry

    path = var_dir / "models.toml"
    path.write_text(registry_toml(specs), encoding="utf-8")
    registry = load_registry(path, var_dir)
    return [registry.models[spec.name] for spec in specs]


# ---------------------------------------------------------------- through the gateway


def request_body(model: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    """Greedy, fixed length, nothing else set: the worker fills in the model's defaults."""
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


async def post_completion(client: Any, body: dict[str, Any]) -> Sample:
    """One non-streaming request, timed from send to the whole answer."""
    import httpx

    started = time.perf_counter()
    try:
        response = await client.post(COMPLETIONS_PATH, json=body)
    except httpx.HTTPError as exc:
        return Sample(status=type(exc).__name__)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return Sample(status=str(response.status_code), seconds=seconds)
    document = response.json()
    return Sample(status="200", seconds=seconds, tokens=int(document["usage"]["completion_tokens"]),
                  text=document["choices"][0]["text"])


def _sse_text(line: str) -> str | None:
    """The text of one SSE ``data:`` line; None for other lines and ``[DONE]``.

    An ``{"error": …}`` event (a failure after the response started) raises,
    so the request counts as failed rather than as a fast first token.
    """
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    event = json.loads(line[len("data: "):])
    if "error" in event:
        raise ValueError(event["error"].get("code", "stream_error"))
    choices = event.get("choices") or []
    if not choices:
        return None  # a usage-only chunk
    return choices[0].get("text") or None


async def stream_first_piece(client: Any, body: dict[str, Any]) -> Sample:
    """One streamed request: time to the first non-empty text piece (the empty opening chunk is skipped)."""
    import httpx

    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []  # read to the end, so the next request finds the worker free
    try:
        async with client.stream("POST", COMPLETIONS_PATH, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Sample(status=str(response.status_code))
            async for line in response.aiter_lines():
                text = _sse_text(line)
                if text and first is None:
                    first = time.perf_counter() - started
                if text:
                    pieces.append(text)
    except httpx.HTTPError as exc:
        return Sample(status=type(exc).__name__)
    except ValueError as exc:
        return Sample(status=f"stream:{exc}")
    if first is None:
        return Sample(status="no_text")
    return Sample(status="200", seconds=first, text="".join(pieces))


async def measure_gateway(base_url: str, headers: dict[str, str], body: dict[str, Any], requests: int,
                          batch: int) -> GatewayRun:
    """Warm-up, sequential requests, one concurrent batch, streamed requests: one after the other."""
    import httpx

    limits = httpx.Limits(max_connections=batch, max_keepalive_connections=batch)
    stream_body = {**body, "stream": True}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=REQUEST_TIMEOUT_S) as client:
        try:
            async with asyncio.timeout(PHASE_TIMEOUT_S):
                await post_completion(client, body)  # the first request pays for lazy set-up
                sequential = [await post_completion(client, body) for _ in range(requests)]
                started = time.perf_counter()
                batched = list(await asyncio.gather(*(post_completion(client, body) for _ in range(batch))))
                batch_wall = time.perf_counter() - started
                first = [await stream_first_piece(client, stream_body) for _ in range(requests)]
        except TimeoutError:
            raise TimeoutError(f"gateway phases for {body['model']} did not finish within "
                               f"{PHASE_TIMEOUT_S:.0f}s") from None
    return GatewayRun(sequential=sequential, batch=batched, batch_wall_s=batch_wall, first_piece=first)


# ---------------------------------------------------------------- directly


def direct_params(model: Any, max_tokens: int) -> Any:
    """The parameters a greedy gateway request gives the worker (defaults as the gateway fills them)."""
    from workers.contract.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=model.spec.repetition_penalty)


def timed_generate(model: Any, params: Any) -> Sample:
    started = time.perf_counter()
    generation = model.generate(PROMPT, params)
    return Sample(status="200", seconds=time.perf_counter() - started, tokens=generation.completion_tokens,
                  text=generation.text)


def time_to_first_piece(model: Any, params: Any) -> Sample:
    """From the call to the first piece, as the worker sees it (tokenizing included); then stop."""
    started = time.perf_counter()
    run = model.stream(PROMPT, params)
    try:
        piece = next(run, None)
        seconds = time.perf_counter() - started
    finally:
        run.close()
    return Sample(status="200" if piece else "no_text", seconds=seconds, tokens=1 if piece else 0)


def measure_direct(spec: Any, max_tokens: int, requests: int) -> DirectRun:
    """Load the model here, warm it up, measure, and free it (its threads must not outlive the phase)."""
    from workers.backends import load_model

    started = time.perf_counter()
    model = load_model(spec)
    load_s = time.perf_counter() - started
    try:
        params = direct_params(model, max_tokens)
        model.generate(PROMPT, params)  # warm-up, as on the gateway side
        sequential = [timed_generate(model, params) for _ in range(requests)]
        first = [time_to_first_piece(model, params) for _ in range(requests)]
    finally:
        close = getattr(model, "close", None)
        if close is not None:
            close()
    return DirectRun(load_s=load_s, sequential=sequential, first_piece=first)


# ---------------------------------------------------------------- main


def _model_names(text: str, skip_gemma: bool) -> list[str]:
    """``--models`` as registry names, in the order given, without repeats."""
    names: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name = ALIASES.get(part, part)
        if name not in ALIASES.values():
            raise ValueError(f"unknown model {part!r}; choose from {', '.join(ALIASES)}")
        if name not in names and not (skip_gemma and name == ALIASES["gemma"]):
            names.append(name)
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_dir = ROOT / "var" / "models"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,gemma", help="models to measure: tiny, gemma (default both)")
    parser.add_argument("--requests", type=int, default=5,
                        help="sequential and streamed requests per model and side (default 5)")
    parser.add_argument("--batch", type=int, default=4, help=f"concurrent requests in the batch (default 4, "
                                                             f"at most {MAX_BATCH}: the policy's in-flight limit)")
    parser.add_argument("--max-tokens-gemma", type=int, default=64, help="max_tokens for gemma (default 64)")
    parser.add_argument("--max-tokens-tiny", type=int, default=256, help="max_tokens for tiny (default 256)")
    parser.add_argument("--skip-gemma", action="store_true", help="leave gemma out whatever --models says")
    parser.add_argument("--models-dir", type=Path, default=default_dir if default_dir.is_dir() else None,
                        help="folder whose gemma file is reused if present (default: var/models if it exists)")
    args = parser.parse_args(argv)
    try:
        args.model_names = _model_names(args.models, args.skip_gemma)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.model_names:
        parser.error("no model left to measure")
    if args.requests < 1 or not 1 <= args.batch <= MAX_BATCH:
        parser.error(f"--requests must be at least 1 and --batch from 1 to {MAX_BATCH}")
    if args.max_tokens_gemma < 1 or args.max_tokens_tiny < 1:
        parser.error("--max-tokens-gemma and --max-tokens-tiny must be at least 1")
    return args


def max_tokens_for(name: str, args: argparse.Namespace) -> int:
    return args.max_tokens_gemma if name == ALIASES["gemma"] else args.max_tokens_tiny


def prepare_models(args: argparse.Namespace, var_dir: Path, say: Callable[[str], None]) -> tuple[Path, list[Any]]:
    """Write the registry and make missing model files here, before any worker starts.

    Why here: a worker would assemble Gemma itself, silently and inside the
    start-up timeout; the supervisor's routine prints progress instead.
    """
    from govgate.model_files import ensure_models
    from workers.contract.registry import Registry

    specs = write_registry(bench_specs(args.model_names, var_dir, args.models_dir), var_dir)
    for spec in specs:
        say(f"{spec.name}: {spec.backend}, {spec.threads} thread(s), file {spec.path}"
            + ("" if spec.path.exists() else " (to be made)"))
    ensure_models(Registry({spec.name: spec for spec in specs}), say)
    return var_dir / "models.toml", specs


def measure_all(args: argparse.Namespace, var_dir: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Start the stack, then per model: gateway phases, then direct phases; stop the stack."""
    models_file, specs = prepare_models(args, var_dir, say)
    say(f"starting the stack: redis, {len(specs)} worker(s), api …")
    running = start_govgate(var_dir, [spec.name for spec in specs], note="bench/inference.py",
                            models_file=str(models_file), request_timeout_s=REQUEST_TIMEOUT_S)
    results = []
    try:
        for spec in specs:
            max_tokens = max_tokens_for(spec.name, args)
            say(f"{spec.name}: gateway, 1 warm-up + {args.requests} sequential + batch of {args.batch} "
                f"+ {args.requests} streamed (max_tokens {max_tokens}) …")
            body = request_body(spec.name, max_tokens)
            gateway = asyncio.run(measure_gateway(running.base_url, running.headers, body, args.requests,
                                                  args.batch))
            say(f"{spec.name}: direct, load + 1 warm-up + {args.requests} generate + {args.requests} first pieces …")
            direct = measure_direct(spec, max_tokens, args.requests)
            results.append(model_figures(spec.name, max_tokens, gateway, direct))
    finally:
        running.stop()
    return results


def run(args: argparse.Namespace) -> int:
    """Measure every model, then print the table and the JSON line."""
    from govgate.redis_server import RedisUnavailable
    from govgate.stack import StartupError
    from workers.backends import BackendError
    from workers.contract.registry import RegistryError

    results = in_temp_dir(lambda var_dir: measure_all(args, var_dir, say),
                          (StartupError, RedisUnavailable, BackendError, RegistryError, TimeoutError, OSError))
    if results is None:
        return 1
    cores = os.cpu_count()
    print(f"{cores} CPU cores; gateway and direct runs take turns (never overlap). POST {COMPLETIONS_PATH}, "
          f"temperature 0, {args.requests} sequential + batch of {args.batch} + {args.requests} streamed "
          f"requests per model; tok/s = completion tokens / request time")
    print(table(results))
    for note in notes(results):
        print(note)
    print(json.dumps({"cpu_cores": cores, "requests": args.requests, "batch": args.batch, "prompt": PROMPT,
                      "models": results}, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_interruptible(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
