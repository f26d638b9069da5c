"""The OpenAI-compatible completion endpoints (thin: the service does the work)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

from litestar import Controller, Request, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.response import Stream

from gateway import urls
from gateway.api.openapi import CHAT_OPERATION, COMPLETION_OPERATION, SECURITY
from gateway.auth import Principal
from gateway.api.bodies import read_body
from gateway.api.dependencies import completion_service
from gateway.api_errors import ApiError
from gateway.drain import Drain
from gateway.observability.context import note_error
from gateway.requests.call_off import KEY_REVOKED, STOPPING, CallOff
from gateway.requests.stream_events import StreamEvents
from gateway.requests.schemas import CHAT, COMPLETIONS
from gateway.requests.service import CompletionService
from gateway.requests.ticket import Ticket
from workers.contract.jobs import JobResult


def _reader(request: Request):
    """The body's read; a stop's drain ends it if the body is still arriving then (refused 503
    ``shutting_down``, recorded ``rejected`` by the admission: a request not yet admitted does not hold the
    stop), as every endpoint's (``gateway/drain_reads.py``)."""
    return lambda: read_body(request)


def _gone(request: Request):
    """A waiter that returns once the client has closed its connection (ASGI ``http.disconnect``).

    The body has been read whole before a job is queued, so the server's next
    message is the disconnect; a non-streamed request's client that gives up
    (a client timeout, a cancelled call) then frees its place in the queue and
    its reservation at once (``TicketRunner.complete``), as a stream's does.
    """
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return wait


def _left(request: Request) -> bool:
    """Whether the client's connection is closed already, so that an answer sent now goes nowhere (uvicorn
    drops what is sent on a closed connection, without an error). The served gateway's protocol puts the
    connection's ``is_closing`` in the scope (``gateway/http_head.py``); a server without it is never read
    as gone. A look at a flag: no task, no wait on the request path."""
    closing = (request.scope.get("extensions") or {}).get(urls.CONNECTION_CLOSING)
    return closing is not None and bool(closing())


def _usage(result: JobResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class _Shape:
    """How one endpoint spells its objects (chat vs text completion)."""

    def __init__(self, endpoint: str) -> None:
        self.chat = endpoint == CHAT
        self.prefix = "chatcmpl" if self.chat else "cmpl"
        self.object = "chat.completion" if self.chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if self.chat else "text_completion"

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason, "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}

    def delta(self, text: str | None, finish_reason: str | None, *, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    def envelope(self, ticket: Ticket, obj: str) -> dict[str, Any]:
        return {"id": f"{self.prefix}-{ticket.request_id}", "object": obj, "created": ticket.created,
                "model": ticket.model}


def _sse(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


async def _sse_events(ticket: Ticket, shape: _Shape, events: StreamEvents,
                      done: Callable[[], None]) -> AsyncIterator[bytes]:
    """Server-Sent Events in OpenAI's chunk format, ending with ``data: [DONE]``.

    Errors after the response has started cannot change its status, so they
    are sent as an ``{"error": …}`` event (the ``openai`` client raises on it).
    ``done`` tells the drain the stream has ended.
    """
    try:
        yield _sse({**shape.envelope(ticket, shape.chunk_object), "choices": [shape.delta("", None, first=True)]})
        async for event in events:
            if isinstance(event, str):
                yield _sse({**shape.envelope(ticket, shape.chunk_object), "choices": [shape.delta(event, None)]})
                continue
            yield _sse({**shape.envelope(ticket, shape.chunk_object),
                        "choices": [shape.delta(None, event.finish_reason)]})
            if ticket.include_usage:
                yield _sse({**shape.envelope(ticket, shape.chunk_object), "choices": [], "usage": _usage(event)})
        yield b"data: [DONE]\n\n"
    except ApiError as error:
        note_error(error.code)  # the status stays 200, but /metrics counts the request under its error code
        yield _sse(error.body())
    finally:
        try:
            await events.aclose()
        finally:
            done()


class CompletionsController(Controller):
    """``POST /v1/chat/completions`` and ``POST /v1/completions``.

    The principal is the handlers' only dependency and the service comes
    from the app's state: Litestar resolves two dependencies of one batch in
    an anyio task group, which cost about 65 µs of CPU per request, a third
    of what a bare Litestar request costs (measured; docs/performance.md, "What moved, 2026-12-01").
    """

    tags = ["completions"]

    @post(urls.CHAT_COMPLETIONS, summary="Create a chat completion (OpenAI-compatible)", status_code=200,
          operation_class=CHAT_OPERATION, security=SECURITY, operation_id="createChatCompletion")
    async def chat(self, request: Request, state: State, principal: NamedDependency[Principal]) -> Response:
        return await _serve(completion_service(state), state.drain, request, principal, CHAT)

    @post(urls.COMPLETIONS, summary="Create a text completion (OpenAI-compatible)", status_code=200,
          operation_class=COMPLETION_OPERATION, security=SECURITY, operation_id="createCompletion")
    async def completion(self, request: Request, state: State, principal: NamedDependency[Principal]) -> Response:
        return await _serve(completion_service(state), state.drain, request, principal, COMPLETIONS)


class _CalledOff:
    """What ends one request before its answer besides its client: its gateway's drain, its key's revocation.

    A non-streamed request waits for :attr:`future` (one per request: watching it makes no task), set by
    the first of the two; a stream is cut (``StreamEvents.cut``) as soon as it has its events. A revocation
    that comes before either is read at the next step (:attr:`revoked`).
    """

    __slots__ = ("future", "events")

    def __init__(self) -> None:
        self.future: asyncio.Future[CallOff] = asyncio.get_running_loop().create_future()
        self.events: StreamEvents | None = None

    def end_for(self, why: CallOff) -> Callable[[], None]:
        def end() -> None:
            if not self.future.done():
                self.future.set_result(why)
            if why is KEY_REVOKED and self.events is not None:
                self.events.cut(KEY_REVOKED)
        return end

    @property
    def revoked(self) -> bool:
        future = self.future
        return future.done() and not future.cancelled() and future.result() is KEY_REVOKED

    def wait(self) -> asyncio.Future[CallOff]:
        return self.future


async def _serve(service: CompletionService, drain: Drain, request: Request, principal: Principal,
                 endpoint: str) -> Response:
    """Admit and answer one request, counted in flight for a stopping gateway's drain (``gateway/drain.py``):
    refused once it drains (also while its body is still arriving), ended with an answer at its cut (also
    while it waits for its policy decision or, admitted, for its job to be queued: ``Drain.unless_cut``).
    Watched for its key's revocation too (``gateway/auth/revocations.py``): ended then, 401
    ``invalid_api_key``, wherever it is (queued, running, streaming)."""
    called_off = _CalledOff()
    leave = drain.enter(called_off.end_for(STOPPING))
    unwatch = service.admitted_keys.watch(principal.key_id, called_off.end_for(KEY_REVOKED))
    ticket = None
    streaming = False
    try:
        ticket = await service.admit(principal, endpoint, _reader(request),
                                     request.headers.getall(urls.PURPOSE_HEADER, []), stopping=drain)
        if called_off.revoked:  # while its decision was awaited: nothing is queued
            raise await service.revoked_before_queue(ticket)
        shape = _Shape(endpoint)
        headers = {urls.REQUEST_ID_HEADER: ticket.request_id}
        if ticket.job.stream:
            events = await service.open_stream(ticket, drain)  # queue errors are still ordinary HTTP errors here
            called_off.events = events
            request_id = ticket.request_id

            def cut() -> None:
                drain.ended_by_cut(request_id)
                events.cut()
            drain_done = drain.enter(cut)  # in flight until its last event is sent (or its client left)
            if called_off.revoked:  # while its job was queued
                events.cut(KEY_REVOKED)

            def done() -> None:
                drain_done()
                unwatch()

            async def close() -> None:
                try:
                    await events.aclose()
                finally:
                    done()

            streaming = True
            # The background task closes the events if the client left before they were read at all.
            return Stream(_sse_events(ticket, shape, events, done), media_type="text/event-stream",
                          headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                          background=BackgroundTask(close))
        result = await service.complete(ticket, _gone(request), called_off.wait, drain)
        if _left(request):  # while its end was recorded: the end says what it was to receive, not got
            await service.left_before_its_answer(ticket)
        return Response({**shape.envelope(ticket, shape.object), "choices": [shape.choice(result.text,
                         result.finish_reason)], "usage": _usage(result)}, headers=headers)
    finally:
        if ticket is not None and not ticket.job.stream:
            drain.ended_by_cut(ticket.request_id)  # only once the cut came
        if not streaming:
            unwatch()
        leave()
