"""The OpenAI-compatible completion endpoints (thin: the service does the work)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException

from gateway import urls
from gateway.auth import Principal
from gateway.completions import CHAT, COMPLETIONS, Admitted
from gateway.errors import ApiError


def _reader(request: Request):
    async def read() -> bytes:
        try:
            return await request.body()
        except HTTPException as exc:
            if exc.status_code == 413:
                raise ApiError(413, "body_too_large",
                               "The request body is larger than this gateway accepts "
                               "(GOVGATE_MAX_BODY_BYTES).") from None
            raise
    return read


def _usage(admitted: Admitted) -> dict[str, int]:
    r = admitted.result
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def _respond(body: dict[str, Any], admitted: Admitted) -> Response:
    return Response(body, headers={urls.REQUEST_ID_HEADER: admitted.request_id})


class CompletionsController(Controller):
    """``POST /v1/chat/completions`` and ``POST /v1/completions``."""

    tags = ["completions"]

    @post(urls.CHAT_COMPLETIONS, summary="Create a chat completion (OpenAI-compatible)", status_code=200)
    async def chat(self, request: Request, state: State, principal: NamedDependency[Principal]) -> Response:
        admitted = await state.components.completions.handle(
            principal, CHAT, _reader(request), request.headers.get(urls.PURPOSE_HEADER))
        return _respond({
            "id": f"chatcmpl-{admitted.request_id}",
            "object": "chat.completion",
            "created": admitted.created,
            "model": admitted.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": admitted.result.text},
                "finish_reason": admitted.result.finish_reason,
                "logprobs": None,
            }],
            "usage": _usage(admitted),
        }, admitted)

    @post(urls.COMPLETIONS, summary="Create a text completion (OpenAI-compatible)", status_code=200)
    async def completion(self, request: Request, state: State, principal: NamedDependency[Principal]) -> Response:
        admitted = await state.components.completions.handle(
            principal, COMPLETIONS, _reader(request), request.headers.get(urls.PURPOSE_HEADER))
        return _respond({
            "id": f"cmpl-{admitted.request_id}",
            "object": "text_completion",
            "created": admitted.created,
            "model": admitted.model,
            "choices": [{
                "index": 0,
                "text": admitted.result.text,
                "finish_reason": admitted.result.finish_reason,
                "logprobs": None,
            }],
            "usage": _usage(admitted),
        }, admitted)
