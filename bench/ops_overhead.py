"""What does observability cost one request? (CPU, with and without it)

Compares, in one process and one run:

* the whole ASGI path of a request through the Litestar app with the
  request middleware (id, header, request counter and duration histogram)
  and without it (``GET /healthz``, which does nothing else, so the
  difference is the middleware alone);
* each one-line hook on the completion path alone (the policy-decision and
  audit-append timers, the token and queue-wait observations, the model
  and error-code notes), against the bare call they wrap;
* one ``/metrics`` scrape's text (without the Redis round trip).

CPU is ``time.process_time`` (the machine is shared: wall time would
measure the neighbours); each figure is the best of ``--repeats`` runs of
``--requests`` calls. The gateway spends about 5.6 ms of CPU on a completion
(docs/performance.md); the sum of the hooks is to be read against that.

Usage::

    .venv/bin/python bench/ops_overhead.py [--requests 5000] [--repeats 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litestar import Litestar, get  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from gateway.observability import context  # noqa: E402
from gateway.observability import metrics  # noqa: E402
from gateway.observability.middleware import RequestContextMiddleware  # noqa: E402


@get("/healthz", sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def app(instrumented: bool) -> Any:
    bare = Litestar(route_handlers=[healthz], logging_config=None, openapi_config=None)
    if instrumented:
        bare.asgi_handler = RequestContextMiddleware(bare.asgi_handler)
    return bare


SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
         "path": "/healthz", "raw_path": b"/healthz", "root_path": "", "query_string": b"",
         "headers": [(b"host", b"bench")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}


async def asgi_requests(application: Any, n: int) -> float:
    """CPU seconds for ``n`` requests through ``application`` (no network, no server)."""
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    started = time.process_time()
    for _ in range(n):
        await application(dict(SCOPE), receive, send)
    return time.process_time() - started


def best(repeats: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeats))


def per_call_us(repeats: int, n: int, call: Callable[[], Any]) -> float:
    def run() -> float:
        started = time.process_time()
        for _ in range(n):
            call()
        return time.process_time() - started
    return best(repeats, run) / n * 1e6


def hooks(repeats: int, n: int) -> dict[str, float]:
    """Each hook's extra CPU per call in µs (its cost minus the bare call it wraps)."""
    loop = asyncio.new_event_loop()

    async def decide() -> int:
        return 1

    def decided(wrapped: bool) -> float:
        async def many() -> float:
            started = time.process_time()
            for _ in range(n):
                await (metrics.timed_decision(decide()) if wrapped else decide())
            return time.process_time() - started
        return best(repeats, lambda: loop.run_until_complete(many())) / n * 1e6

    ctx, token = context.begin()
    try:
        figures = {
            "policy decision timer": decided(True) - decided(False),
            "audit append timer": per_call_us(repeats, n, lambda: metrics.observe_append("request", 0.0002)),
            "tokens + queue wait": per_call_us(repeats, n, lambda: metrics.observe_result("m", 12, 8, 3.5)),
            "model note": per_call_us(repeats, n, lambda: context.note_model("m")),
            "error-code note": per_call_us(repeats, n, lambda: context.note_error("policy_denied")),
        }
    finally:
        context.end(token)
        loop.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"best of {args.repeats} x {args.requests} calls, CPU time (time.process_time)")
    plain, instrumented = app(False), app(True)
    loop = asyncio.new_event_loop()
    runs = {"without": float("inf"), "with": float("inf")}
    for _ in range(args.repeats):  # interleaved, so a busy spell on the machine hits both sides
        for name, application in (("without", plain), ("with", instrumented)):
            runs[name] = min(runs[name], loop.run_until_complete(asgi_requests(application, args.requests)))
    loop.close()
    without_us = runs["without"] / args.requests * 1e6
    with_us = runs["with"] / args.requests * 1e6
    print(f"GET /healthz through Litestar: {without_us:.1f} µs without the middleware, {with_us:.1f} µs with "
          f"(+{with_us - without_us:.1f} µs, x{with_us / without_us:.2f})")
    uuid_us = per_call_us(args.repeats, args.requests, lambda: uuid.uuid4().hex)
    print(f"  of which the request id (uuid4), which the admission made itself before: {uuid_us:.1f} µs")
    extra = with_us - without_us - uuid_us
    for name, us in hooks(args.repeats, args.requests).items():
        print(f"  hook {name}: +{us:.2f} µs")
        extra += us
    print(f"extra CPU per completion (middleware + every hook - the id it made anyway): {extra:.1f} µs = "
          f"{extra / 5600 * 100:.2f}% of the gateway's ~5.6 ms per completion")
    scrape_us = per_call_us(args.repeats, max(args.requests // 100, 20), lambda: generate_latest(metrics.REGISTRY))
    print(f"one /metrics exposition (process registry, without the Redis read): {scrape_us:.0f} µs")


if __name__ == "__main__":
    main()
