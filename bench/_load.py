"""A deliberately light HTTP/1.1 load client: raw asyncio streams, kept-alive connections.

Why not httpx: a bare Litestar app answers a request in a fraction of a
millisecond of CPU, and httpx spends more than that per request on the
client side, so with httpx a load test of a 2-core machine measures the
client. Here each request is one pre-encoded ``bytes`` write and a small
parse of the status line and headers; the body is read by Content-Length
or chunk by chunk. Nothing here follows redirects, retries, or speaks TLS:
the benches talk to servers they started on loopback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench._figures import percentile

__all__ = ["Connection", "Endpoint", "Phase", "run_phase"]

#: The longest a single request may take before it counts as an error.
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Endpoint:
    """Where to send, and the one request every loop sends, encoded once."""

    host: str
    port: int
    request: bytes

    @classmethod
    def post_json(cls, base_url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> "Endpoint":
        url = urlsplit(base_url)
        payload = json.dumps(body).encode()
        lines = [f"POST {path} HTTP/1.1", f"Host: {url.hostname}:{url.port}", "Content-Type: application/json",
                 f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in headers.items())]
        return cls(str(url.hostname), int(url.port or 80), ("\r\n".join(lines) + "\r\n\r\n").encode() + payload)


class Connection:
    """One kept-alive HTTP/1.1 connection; reopened by the caller after a failure."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.reusable = True

    @classmethod
    async def open(cls, endpoint: Endpoint) -> "Connection":
        return cls(*await asyncio.open_connection(endpoint.host, endpoint.port, limit=1 << 20))

    def close(self) -> None:
        self.writer.close()

    async def send(self, request: bytes) -> tuple[int, dict[str, str]]:
        """Write one request; read the status code and headers (lower-cased names)."""
        self.writer.write(request)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        if headers.get("connection", "").lower() == "close":
            self.reusable = False
        return status, headers

    async def chunks(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """The body as it arrives: chunk by chunk when chunked, else in one piece."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                data = await self.reader.readexactly(size + 2)  # the chunk and its CRLF
                if size == 0:
                    return  # no trailers are sent by the servers benched here
                yield data[:-2]
        elif "content-length" in headers:
            yield await self.reader.readexactly(int(headers["content-length"]))
        else:
            self.reusable = False
            yield await self.reader.read()

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """One whole request/response; the body is read to the end so the connection can be reused."""
        status, headers = await self.send(request)
        body = b"".join([piece async for piece in self.chunks(headers)])
        return status, body


@dataclass
class Phase:
    """The outcome of one measured run of requests against one server."""

    requests: int
    concurrency: int
    wall_s: float
    #: Latency of every 2xx request, in milliseconds.
    latencies_ms: list[float]
    #: Status code (as text) or exception name -> how many.
    statuses: Counter = field(default_factory=Counter)
    #: CPU this process spent driving the phase: near wall time means the client was the bottleneck.
    client_cpu_s: float = 0.0

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not (status.isdigit() and status.startswith("2")))

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile of the 2xx requests' latency."""
        return percentile(self.latencies_ms, p)


async def run_phase(endpoint: Endpoint, count: int, concurrency: int, *,
                    on_start: Callable[[], None] = lambda: None, on_stop: Callable[[], None] = lambda: None,
                    phase_timeout_s: float = 300.0) -> Phase:
    """``count`` requests, ``concurrency`` connections each sending one request at a time.

    Connections are opened before ``on_start`` runs and the clock starts, so a
    CPU probe called there sees requests only, not TCP handshakes; ``on_stop``
    runs as soon as the last response is in.
    """
    connections = [await Connection.open(endpoint) for _ in range(concurrency)]
    latencies: list[float] = []
    statuses: Counter = Counter()
    numbers = iter(range(count))  # shared: each loop takes the next request number

    async def loop(index: int) -> None:
        for _ in numbers:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, _ = await connections[index].exchange(endpoint.request)
                outcome = str(status)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
                outcome, status = type(exc).__name__, 0
                connections[index].reusable = False
            if 200 <= status < 300:
                latencies.append((time.perf_counter() - started) * 1000)
            statuses[outcome] += 1
            if not connections[index].reusable:
                connections[index].close()
                connections[index] = await Connection.open(endpoint)

    on_start()
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        async with asyncio.timeout(phase_timeout_s):
            await asyncio.gather(*(loop(i) for i in range(concurrency)))
        wall, client_cpu = time.perf_counter() - started, time.process_time() - cpu_started
        on_stop()
    except TimeoutError:
        raise TimeoutError(f"{count} requests to {endpoint.host}:{endpoint.port} did not finish "
                           f"within {phase_timeout_s:.0f}s") from None
    finally:
        for connection in connections:
            connection.close()
    return Phase(requests=count, concurrency=concurrency, wall_s=wall, latencies_ms=latencies,
                 statuses=statuses, client_cpu_s=client_cpu)
