"""Turning a raw request body into a validated request, or a designed error.

Syntax errors (not JSON, not an object) are 400; a well-formed body that
breaks the schema (missing field, wrong type, out-of-range value) is 422 and
names the offending parameter; a parameter or value govgate does not support
is 400 ``unsupported_parameter``.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from gateway.api.schemas import ChatCompletionRequest, CompletionRequest
from gateway.errors import ApiError

T = TypeVar("T", ChatCompletionRequest, CompletionRequest)

_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")
_MISSING_FIELD = re.compile(r"Object missing required field `(?P<field>[^`]+)`")


def parse_body(raw: bytes, kind: type[T]) -> T:
    """Decode and validate ``raw`` as ``kind``; raise :class:`ApiError` on any problem."""
    if not raw.strip():
        raise ApiError(400, "invalid_json", "The request body is empty; send a JSON object.")
    try:
        document = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"The request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    try:
        request = msgspec.convert(document, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from None
    _check_supported(request)
    return request


def _validation_error(message: str) -> ApiError:
    path_match = _PATH.search(message)
    path = path_match.group("path") if path_match else ""
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown:
        field = f"{path}.{unknown.group('field')}" if path else unknown.group("field")
        return ApiError(400, "unsupported_parameter",
                        f"Unsupported parameter: '{field}' is not accepted by this gateway.", param=field)
    missing = _MISSING_FIELD.search(message)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return ApiError(422, "invalid_value", f"Invalid request: {message}", param=path or None)


def _check_supported(request: ChatCompletionRequest | CompletionRequest) -> None:
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "unsupported_parameter", "'stream_options' is only allowed with 'stream': true.",
                       param="stream_options")
    if request.n != 1:
        raise ApiError(400, "unsupported_parameter", "Only one choice per request is supported ('n' must be 1).",
                       param="n")
    if isinstance(request, CompletionRequest) and isinstance(request.prompt, list) and len(request.prompt) != 1:
        raise ApiError(400, "unsupported_parameter",
                       "Send one prompt per request; batches of prompts are not supported.", param="prompt")
    if isinstance(request, ChatCompletionRequest) and request.messages[-1].role == "assistant":
        raise ApiError(422, "invalid_value", "The last message must not be the assistant's own.",
                       param="messages")
