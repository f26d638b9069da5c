"""A stream whose client left: the output report its worker sent is still answered (real Redis).

A client that hangs up makes the gateway cancel the job (``TicketRunner.abandon``). A worker that
had finished before it saw the cancel reports its output and waits for the verdict; the stream's
own wait must still hear that report, also when it reached the stream unread or arrives while the
stream is being closed. Lost, the worker waited its whole verdict timeout (10 s, its model idle)
and recorded ``failed``/``output_unchecked`` instead of the client's cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis

from gateway.dispatch import ResultWaiter
from gateway.requests.outcome import TicketRunner
from gateway.requests.stream_events import StreamEvents
from gateway.requests.output_rules import OutputRules
from gateway.requests.ticket import Ticket
from workers.contract.jobs import STATUS_CANCELLED, JobResult
from workers.contract.output_check import OutputReport
from workers.contract.sealing import Sealer
from workers.replies import deliver, success
from workers.streams import RedisJobChannel

pytestmark = pytest.mark.anyio

SEALER = Sealer(os.urandom(32))


class _Rules:
    """The output rules, as far as an abandoned stream uses them: the reports they are asked to answer."""

    def __init__(self) -> None:
        self.answered: list[tuple[str, bool]] = []
        #: Requests whose worker was told ``cancelled`` (with what the client received) as the client left.
        self.told_cancelled: list[str] = []

    def hold(self) -> object:
        return SimpleNamespace(stopped=False)

    async def answer(self, ticket, hold, report, *, abandoned=False):
        self.answered.append((report.text, abandoned))

    async def cancelled(self, ticket, hold, *, client_text=None, key_revoked=False):
        self.told_cancelled.append(ticket.request_id)


class _Log:
    async def terminal_for(self, request_id):
        return SimpleNamespace(body={"usage": {"prompt_tokens": 1, "completion_tokens": 2}})

    async def end(self, *args, **kwargs):  # pragma: no cover - the worker's entry is found
        return None


@pytest.fixture
async def parts(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    worker = redis.Redis.from_url(redis_server.url)
    waiter = ResultWaiter(client, SEALER)
    await waiter.start()
    rules = _Rules()
    runner = TicketRunner(dispatcher=None, waiter=waiter, redis=client, counters=None, request_log=_Log(),
                          digester=None, request_timeout_s=5, output_rules=rules)
    try:
        yield SimpleNamespace(runner=runner, waiter=waiter, worker=worker, rules=rules)
    finally:
        await runner.aclose()
        await waiter.aclose()
        await client.aclose()
        worker.close()



async def _background_done(parts) -> None:
    """Wait (at most 2 s) for the runner's background ends of abandoned requests to finish."""
    for _ in range(200):
        if not parts.runner._background:
            break
        await asyncio.sleep(0.01)
    assert not parts.runner._background

async def test_a_report_that_reached_the_stream_unread_is_answered_after_the_client_left(parts):
    request_id = "abandon-unread"
    ticket = Ticket(request_id=request_id, principal=None, model="tiny", created=0, job=None)
    async with contextlib.AsyncExitStack() as stack:
        pending = await stack.enter_async_context(parts.waiter.expect(request_id, stream=True, checked=True))
        events = StreamEvents(parts.runner, ticket, pending, stack.pop_all(), checked=True)
    channel = RedisJobChannel(parts.worker, request_id, streaming=True, sealer=SEALER,
                              reply_to=parts.waiter.reply_channel)
    # The worker finished, reports its output and waits for the verdict (in its own thread).
    waiting = asyncio.ensure_future(asyncio.to_thread(channel.await_verdict, OutputReport("all of it"), 3))
    for _ in range(200):
        if pending.backlog():
            break
        await asyncio.sleep(0.01)
    assert pending.backlog() == 1  # the report reached the stream, which never read it
    await events.aclose()  # the client hung up
    for _ in range(200):
        if parts.rules.answered:
            break
        await asyncio.sleep(0.01)
    assert parts.rules.answered == [("all of it", True)]
    assert parts.rules.told_cancelled == [request_id]  # told first, before the cancel key
    await waiting
    # The worker records its end and publishes the outcome: the abandoned request's wait ends with it.
    result = JobResult(status=STATUS_CANCELLED, text="", audit_seq=2).sealed(SEALER)
    deliver(parts.worker, request_id, parts.waiter.reply_channel, success(result))
    await _background_done(parts)
    channel.forget()


class _StuckOnTheLastWindow:
    """A policy engine that judges a stream's windows at once (allow) but never finishes the last one."""

    revision = "rev-test"

    def __init__(self) -> None:
        self.last_window_asked = asyncio.Event()

    async def decide_output_with_revision(self, document):
        if document["final"]:
            self.last_window_asked.set()
            await asyncio.Event().wait()  # until cancelled with its client
        return SimpleNamespace(allow=True, reasons=(), redact=(), log_redact=()), self.revision


async def test_a_report_being_judged_when_the_client_left_is_answered_cancelled_with_what_it_received(parts):
    """The stream read the report and was judging its last window when its client left.

    The judgement went with the client (Litestar cancels the stream's task), and the report had been
    read: nobody answered it, and the worker waited out its whole verdict timeout. It is answered
    ``cancelled``, with the text the client received, so the worker records that end at once.
    """
    request_id = "abandon-judging"
    policy = _StuckOnTheLastWindow()
    rules = OutputRules(policy=policy, redis=parts.runner.redis, sealer=SEALER, holdback_chars=4,
                        build_input=lambda ticket, window: {"text": window.text, "final": window.final})
    parts.runner.output_rules = rules
    ticket = Ticket(request_id=request_id, principal=None, model="tiny", created=0, job=None)
    async with contextlib.AsyncExitStack() as stack:
        pending = await stack.enter_async_context(parts.waiter.expect(request_id, stream=True, checked=True))
        events = StreamEvents(parts.runner, ticket, pending, stack.pop_all(), checked=True)
    channel = RedisJobChannel(parts.worker, request_id, streaming=True, sealer=SEALER,
                              reply_to=parts.waiter.reply_channel, flush_interval_s=0)
    received: list[str] = []

    async def client() -> None:
        async for event in events:
            received.append(event)

    reading = asyncio.ensure_future(client())
    try:
        channel.publish("Once upon a time ")  # a window is due: judged, and all but the hold-back released
        for _ in range(200):
            if received:
                break
            await asyncio.sleep(0.01)
        assert received and all(isinstance(text, str) for text in received)
        output = "Once upon a time there was a gateway."
        channel.publish(output[len("Once upon a time "):])
        channel.flush()
        waiting = asyncio.ensure_future(asyncio.to_thread(channel.await_verdict, OutputReport(output), 3))
        await asyncio.wait_for(policy.last_window_asked.wait(), 5)
        reading.cancel()  # the client hung up: its task is cancelled mid-judgement
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        verdict = await waiting
    finally:
        reading.cancel()
    assert verdict is not None and verdict.cancelled
    assert verdict.client_text == "".join(received) and verdict.client_text  # what it received, not the tail
    assert output.startswith(verdict.client_text) and verdict.client_text != output
    # The worker records its cancelled end and publishes the outcome: the abandoned request's wait ends with it.
    result = JobResult(status=STATUS_CANCELLED, text=verdict.client_text, audit_seq=2).sealed(SEALER)
    deliver(parts.worker, request_id, parts.waiter.reply_channel, success(result))
    await _background_done(parts)
    channel.forget()


class _HeldLastWindow:
    """A policy engine that judges a stream's windows at once (allow) and its last one when let go (allow)."""

    revision = "rev-test"

    def __init__(self) -> None:
        self.last_window_asked = asyncio.Event()
        self.let_go = asyncio.Event()

    async def decide_output_with_revision(self, document):
        if document["final"]:
            self.last_window_asked.set()
            await self.let_go.wait()
        return SimpleNamespace(allow=True, reasons=(), redact=(), log_redact=()), self.revision


async def test_a_stream_cut_while_its_last_window_is_judged_tells_its_worker_cancelled_not_the_allow(parts):
    """The stopping gateway's drain cut a stream whose last window (its worker's report) was being judged.

    Before (probe q1 F2), the cut only queued its mark behind the report: the judgement finished, its
    "allow, whole" verdict went to the worker, which recorded ``completion`` with ``client_output`` = the whole
    output, while the client got the ``shutting_down`` error event and none of that tail. The cut wins now:
    the judgement's verdict is neither released nor sent; the worker is told ``cancelled`` with what the
    client received, and the client gets the error event.
    """
    from gateway.api_errors import ApiError

    request_id = "cut-judging"
    policy = _HeldLastWindow()
    rules = OutputRules(policy=policy, redis=parts.runner.redis, sealer=SEALER, holdback_chars=4,
                        build_input=lambda ticket, window: {"text": window.text, "final": window.final})
    parts.runner.output_rules = rules
    ticket = Ticket(request_id=request_id, principal=None, model="tiny", created=0, job=None)
    async with contextlib.AsyncExitStack() as stack:
        pending = await stack.enter_async_context(parts.waiter.expect(request_id, stream=True, checked=True))
        events = StreamEvents(parts.runner, ticket, pending, stack.pop_all(), checked=True)
    channel = RedisJobChannel(parts.worker, request_id, streaming=True, sealer=SEALER,
                              reply_to=parts.waiter.reply_channel, flush_interval_s=0)
    received: list[str] = []

    async def client() -> ApiError | None:
        try:
            async for event in events:
                received.append(event)
        except ApiError as error:
            return error
        return None

    reading = asyncio.ensure_future(client())
    try:
        channel.publish("Once upon a time ")
        for _ in range(200):
            if received:
                break
            await asyncio.sleep(0.01)
        assert received and all(isinstance(text, str) for text in received)
        output = "Once upon a time there was a gateway."
        channel.publish(output[len("Once upon a time "):])
        channel.flush()
        waiting = asyncio.ensure_future(asyncio.to_thread(channel.await_verdict, OutputReport(output), 5))
        await asyncio.wait_for(policy.last_window_asked.wait(), 5)
        events.cut()  # the drain's time is over while the last window is judged
        policy.let_go.set()  # a judgement that still finishes must not be the worker's answer
        verdict = await waiting
        error = await asyncio.wait_for(reading, 10)
    finally:
        reading.cancel()
    assert verdict is not None and verdict.cancelled, verdict
    assert verdict.client_text == "".join(received) and verdict.client_text
    assert verdict.client_text != output  # the tail the judgement would have released never reached the client
    assert error is not None and error.code == "shutting_down"
    assert all(isinstance(text, str) for text in received)  # no result: the stream ended with the error
    result = JobResult(status=STATUS_CANCELLED, text=verdict.client_text, audit_seq=2).sealed(SEALER)
    deliver(parts.worker, request_id, parts.waiter.reply_channel, success(result))
    await _background_done(parts)
    channel.forget()


class _Probing:
    """Output rules whose probe (does the revision have an output rule?) does not answer until cancelled."""

    asked = None

    async def rule_absent(self, ticket):
        self.asked.set()
        await asyncio.Event().wait()

    async def discard(self, request_id):  # a withdrawn request's verdict taken back: none was sent here
        pass


class _Ends:
    def __init__(self) -> None:
        self.ended: list[tuple[str, str, dict]] = []

    async def end(self, ticket, kind, body):
        self.ended.append((ticket.request_id, kind, body))
        return None


async def test_an_admitted_request_waiting_for_the_output_rules_probe_is_ended_at_the_cut(parts):
    """Admitted (its ``request`` entry written, its tokens reserved) and not queued yet, a request waited
    for the output rules' probe when the drain's cut came. Before (probe q1 F1), nothing could end it: no
    answer, no terminal entry, its reservation held until the lost-request sweep. Now it is ended
    ``cancelled`` (the gateway stopped), its reservation released, 503 ``shutting_down``."""
    from gateway.api_errors import ApiError
    from gateway.drain import Drain

    rules, log = _Probing(), _Ends()
    rules.asked = asyncio.Event()
    parts.runner.output_rules = rules
    parts.runner.request_log = log
    drain = Drain(0.0)
    ticket = Ticket(request_id="cut-probing", principal=None, model="tiny", created=0,
                    job=SimpleNamespace(prompt_logging="none", redact=[]))
    serving = asyncio.ensure_future(parts.runner.complete(ticket, stopping=drain))
    await asyncio.wait_for(rules.asked.wait(), 5)
    drain.cut()
    with pytest.raises(ApiError) as raised:
        await asyncio.wait_for(serving, 10)
    assert raised.value.code == "shutting_down" and raised.value.status == 503
    assert [(request_id, kind) for request_id, kind, _ in log.ended] == [("cut-probing", "cancelled")]
    assert "gateway stopped" in log.ended[0][2]["error"]["message"]
