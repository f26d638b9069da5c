"""Awaiting Celery results on the event loop, without a thread per request.

One shared pub/sub connection per gateway process resolves a future per
pending request; results and stream pieces arrive sealed and are opened here,
so the rest of the gateway sees plain results. See docs/architecture.md,
section "gateway/requests and gateway/dispatch".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any, AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from workers.contract.jobs import STREAM_CHANNEL_PREFIX, open_piece, open_result, stream_channel
from workers.contract.sealing import SealError, Sealer

log = logging.getLogger(__name__)

#: Celery's Redis result backend stores a task's result under this prefix plus
#: the task id and PUBLISHes it on a channel of the same name.
_CHANNEL_PREFIX = "celery-task-meta-"


class ResultTimeout(TimeoutError):
    """No result arrived within the request's timeout."""


class PendingResult:
    """A subscription for one task's result; await :meth:`get`, or iterate :meth:`events`."""

    def __init__(self, waiter: "ResultWaiter", task_id: str, future: asyncio.Future,
                 pieces: asyncio.Queue | None = None) -> None:
        self._waiter = waiter
        self.task_id = task_id
        self._future = future
        self._pieces = pieces

    async def events(self, timeout_s: float) -> AsyncIterator[str | dict[str, Any]]:
        """Text pieces as the worker publishes them, then the final Celery meta dict.

        Pieces are published before the result, on the same subscription, so
        every piece is yielded before the meta. Raises :class:`ResultTimeout`
        when the whole exchange takes longer than ``timeout_s``.
        """
        assert self._pieces is not None, "expect(..., stream=True) is needed to read pieces"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await self._waiter._check_stored(self.task_id)
        while True:
            while not self._pieces.empty():
                yield self._pieces.get_nowait()
            if self._future.done():
                yield self._future.result()
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ResultTimeout(f"no result for {self.task_id} within {timeout_s:g}s")
            getter = asyncio.ensure_future(self._pieces.get())
            try:
                done, _ = await asyncio.wait({getter, self._future}, timeout=remaining,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the reader is cancelled (client gone): no orphaned task
                if not getter.done():
                    getter.cancel()
            if getter in done:
                yield getter.result()

    async def get(self, timeout_s: float) -> dict[str, Any]:
        """The task's Celery meta dict (``status``, ``result``, …)."""
        await self._waiter._check_stored(self.task_id)
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout_s)
        except asyncio.TimeoutError:
            raise ResultTimeout(f"no result for {self.task_id} within {timeout_s:g}s") from None


class ResultWaiter:
    """One pub/sub listener resolving futures for every pending request."""

    def __init__(self, client: aioredis.Redis, sealer: Sealer) -> None:
        self._client = client
        self._sealer = sealer
        self._pubsub = client.pubsub()
        self._pending: dict[str, asyncio.Future] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        self._listener: asyncio.Task | None = None
        self._control_channel = f"govgate:gateway:{uuid.uuid4().hex}"

    async def start(self) -> None:
        # A standing subscription keeps the connection open and the listener's
        # loop alive while no request is pending.
        await self._pubsub.subscribe(self._control_channel)
        self._listener = asyncio.create_task(self._listen(), name="govgate-result-listener")

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()

    @contextlib.asynccontextmanager
    async def expect(self, task_id: str, *, stream: bool = False) -> AsyncIterator[PendingResult]:
        """Subscribe to ``task_id``'s result (and its text pieces) before the task is sent.

        Raises ``redis.RedisError`` (or ``OSError``) when Redis is unreachable.
        """
        future = asyncio.get_running_loop().create_future()
        self._pending[task_id] = future
        channels = [_CHANNEL_PREFIX + task_id]
        pieces: asyncio.Queue | None = None
        if stream:
            pieces = self._streams[task_id] = asyncio.Queue()
            channels.append(stream_channel(task_id))
        try:
            await self._subscribe(channels)
            yield PendingResult(self, task_id, future, pieces)
        finally:
            self._pending.pop(task_id, None)
            self._streams.pop(task_id, None)
            await self._unsubscribe(channels)

    async def _subscribe(self, channels: list[str]) -> None:
        """Subscribe, with one retry; any failure leaves as a ``RedisError``.

        While the listener re-establishes a lost connection, redis-py 8.1's
        ``PubSub.subscribe`` can fail with a non-Redis error (an
        ``AttributeError`` from a connection torn down under it). Callers
        handle ``RedisError`` as "the queue is unavailable" (503 and a
        terminal entry); anything else would reach the client as a 500 and
        leave an accepted request without its end.
        """
        for attempt in (1, 2):
            try:
                await self._pubsub.subscribe(*channels)
                return
            except (RedisError, OSError):
                if attempt == 2:
                    raise
            except Exception as exc:  # noqa: BLE001 - redis-py internals, see above
                if attempt == 2:
                    raise RedisError(f"subscribing failed: {type(exc).__name__}: {exc}") from exc
            await asyncio.sleep(0.05)

    async def _unsubscribe(self, channels: list[str]) -> None:
        """Unsubscribe if Redis lets us; no failure leaves here.

        It runs as ``expect`` exits, often while the listener re-establishes a
        lost connection, when redis-py 8.1's ``PubSub.unsubscribe`` can fail
        with a non-Redis error (``AttributeError: 'NoneType' object has no
        attribute 'writelines'``: the listener's reconnect closed the
        connection between the send's check and its write). Escaping, it would
        replace the request's own outcome (a result, a timeout, a
        ``RedisError``) and reach the client as a 500. A channel left
        subscribed is harmless: its messages find no pending request.
        """
        try:
            await self._pubsub.unsubscribe(*channels)
        except (RedisError, OSError):
            pass
        except Exception as exc:  # noqa: BLE001 - redis-py internals, see above
            log.warning("unsubscribing failed (%s: %s)", type(exc).__name__, exc)

    async def _check_stored(self, task_id: str) -> None:
        # The order is: subscribe, enqueue, then also GET the key, so a result
        # stored before the subscription took effect (or while the connection was
        # being re-established) is not missed.
        raw = await self._client.get(_CHANNEL_PREFIX + task_id)
        if raw is not None:
            self._resolve(task_id, raw)

    def _resolve(self, task_id: str, raw: bytes | str) -> None:
        future = self._pending.get(task_id)
        if future is None or future.done():
            return
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError):
            log.error("unreadable result for %s", task_id)
            return
        # Celery may publish intermediate states; only final ones end the wait.
        if meta.get("status") in {"SUCCESS", "FAILURE", "REVOKED"}:
            if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict):
                meta["result"] = open_result(meta["result"], self._sealer)
            future.set_result(meta)

    def _piece(self, task_id: str, raw: bytes | str) -> None:
        queue = self._streams.get(task_id)
        if queue is None:
            return
        try:
            queue.put_nowait(open_piece(self._sealer, raw))
        except (SealError, TypeError, ValueError, KeyError):
            log.error("unreadable stream piece for %s", task_id)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any redis-py failure
                log.warning("result listener lost Redis (%s: %s); retrying in %.1fs", type(exc).__name__, exc,
                            backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                await self._recover()
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            if channel.startswith(_CHANNEL_PREFIX):
                self._resolve(channel[len(_CHANNEL_PREFIX):], message["data"])
            elif channel.startswith(STREAM_CHANNEL_PREFIX):
                self._piece(channel[len(STREAM_CHANNEL_PREFIX):], message["data"])

    async def _recover(self) -> None:
        """After a reconnect, pick up results that were published meanwhile."""
        for task_id in list(self._pending):
            with contextlib.suppress(RedisError, OSError):
                await self._check_stored(task_id)
