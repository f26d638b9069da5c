"""The OpenAPI description of the API, written from the msgspec structs.

The completion handlers read the raw body themselves (so a body the gateway
rejects is still audited), so Litestar sees no request type; the operation
classes here fill in the request and success bodies (``msgspec.json.schema`` of
the very structs), the bearer requirement and every error of README's table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar.openapi.spec.enums import OpenAPIType
from litestar.openapi.spec import (
    Components,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    Parameter,
    RequestBody,
    Schema,
    SecurityScheme,
)

from gateway import urls
from gateway.api import shapes
from gateway.limits.catalogue import RETRYABLE_CODES_IN_ORDER
from gateway.requests.purpose import MAX_PURPOSE_CHARS
from gateway.requests.schemas import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
)
from workers.contract.registry import TINY_MODEL_NAME

BEARER = "bearer"
#: The security requirement of every ``/v1`` route.
SECURITY: list[dict[str, list[str]]] = [{BEARER: []}]
COMPONENTS = Components(security_schemes={BEARER: SecurityScheme(
    type="http", scheme="bearer", bearer_format="gk_…",
    description="An API key made with 'govgate keys create', sent as 'Authorization: Bearer gk_…'.")})

JSON = "application/json"
_SSE = "text/event-stream"


@dataclass
class JsonSchema(Schema):
    """A JSON Schema document written by msgspec, passed through to the description as is."""

    document: dict[str, Any] = field(default_factory=dict)

    def to_schema(self) -> dict[str, Any]:
        return self.document


def json_schema(kind: Any) -> dict[str, Any]:
    """``msgspec.json.schema`` of ``kind`` with every ``$ref`` replaced by its definition.

    Inlined per operation because Litestar rebuilds ``components/schemas``
    from its own types and would drop ours.

    The structs are not recursive, so inlining ends; a recursive one would
    fail here loudly rather than produce a dangling reference.
    """
    document = msgspec.json.schema(kind)
    definitions = document.pop("$defs", {})

    def inline(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [inline(item, seen) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name in seen:
                raise ValueError(f"recursive schema {name} cannot be inlined")
            return inline(definitions[name], (*seen, name))
        return {key: inline(value, seen) for key, value in node.items()}

    return inline(document, ())


def _either(codes: tuple[str, ...]) -> str:
    """```a`, `b` or `c``` for an error description."""
    quoted = [f"`{code}`" for code in codes]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


def header(description: str, schema: dict[str, Any], *, required: bool = True) -> OpenAPIHeader:
    """A response header of the description."""
    return OpenAPIHeader(description=description, required=required, schema=JsonSchema(document=schema))


_REQUEST_ID = header("The id of this request's audit entries ('govgate audit show <id>').",
                     {"type": "string", "minLength": 1})
_OPENAI_REQUEST_ID = header("The same id as X-Govgate-Request-Id, under the name OpenAI's clients read.",
                            {"type": "string", "minLength": 1})
#: 415, as every route that reads a body answers it.
UNSUPPORTED_CODING = ("`unsupported_content_encoding`: the body has a `Content-Encoding` (gzip, br…); bodies are "
                      "read only uncompressed (then with `Accept-Encoding`). `unsupported_media_type`: the body "
                      "is declared in a charset other than UTF-8.",
                      {"Accept-Encoding": header("'identity' with `unsupported_content_encoding`: bodies are read "
                                                 "uncompressed.", {"type": "string"}, required=False)})
#: 501, as every route that reads a body answers it.
UNSUPPORTED_TRANSFER_CODING = ("`unsupported_transfer_encoding`: the body is framed with a transfer coding besides "
                               "`chunked` (`Transfer-Encoding: gzip, chunked`), which the gateway does not undo.",
                               {"x-should-retry": header("Always 'false'.", {"type": "string", "enum": ["false"]})})
_RETRY_AFTER = header("Seconds to wait before trying again; absent when no wait lets the request pass (it alone "
                      "needs more than a token limit).", {"type": "integer", "minimum": 0}, required=False)
_CHALLENGE = header("Always 'Bearer'.", {"type": "string"})
_UNAVAILABLE_RETRY_AFTER = header("Seconds to wait before trying again: with `policy_unavailable`, "
                                  "`model_unavailable`, `queue_lost` and an output withheld for `policy_unavailable`.",
                                  {"type": "integer", "minimum": 0}, required=False)

#: 431, as every route answers it: the bound on a request's head is the HTTP layer's (gateway/http_head.py),
#: met before any route is chosen, so :func:`error_responses` adds it to every operation.
HEAD_TOO_LARGE = ("`request_header_fields_too_large`: the request line and headers together are over 16 KiB; the "
                  "server closes the connection (the request was never read, so it has no audit entry).", {})

#: status -> (description, extra headers): README's error table, per status.
_COMPLETION_ERRORS: dict[int, tuple[str, dict[str, OpenAPIHeader]]] = {
    400: ("`invalid_json` (not a JSON object), `unsupported_parameter` (an unknown field, `n` > 1, several "
          "prompts, a penalty the model's backend ignores) or `context_length_exceeded` (prompt + max_tokens "
          "do not fit the model's context).", {}),
    401: ("`missing_api_key` or `invalid_api_key`: no key, malformed, unknown or revoked; `invalid_api_key` "
          "also ends a request whose key is revoked while it is in flight.",
          {"WWW-Authenticate": _CHALLENGE}),
    403: ("`policy_denied`: the policy said no to a model this key may see; `error.reasons` lists why.", {}),
    404: ("`model_not_found`: no such model in the registry, or one this key may not see (GET /v1/models does "
          "not list it), answered alike whatever else refused the request.", {}),
    413: ("`body_too_large`: the body is over GOVGATE_MAX_BODY_BYTES.", {}),
    415: UNSUPPORTED_CODING,
    431: HEAD_TOO_LARGE,
    501: UNSUPPORTED_TRANSFER_CODING,
    422: ("`invalid_value`: a missing field, a wrong type or an out-of-range value (`param` names it: "
          "`metadata` beyond its bounds, a declared purpose that is not a label or two that differ name "
          "`metadata`, `metadata.<key>`, `metadata.purpose` or the X-Govgate-Purpose header), or a "
          "character the model's backend cannot take (a NUL for ctransformers models).", {}),
    429: (f"{_either(RETRYABLE_CODES_IN_ORDER)}: a usage limit or the "
          "model's queue is full (in fair mode, the places of the caller's team: its share of the model's "
          "queue, named in the message); `error.reasons` says which, `Retry-After` when to try again.",
          {"Retry-After": _RETRY_AFTER,
           "x-should-retry": header("'false' when no wait lets the request pass: ask for fewer tokens instead.",
                                    {"type": "string", "enum": ["false"]}, required=False)}),
    502: ("`worker_error`, `generation_failed`, `worker_lost`, `stream_inconsistent` or `output_not_kept`: "
          "the model worker failed, or a stream's text could not be matched to the recorded output, or a "
          "completed output kept only as a digest could not be served again (logged and audited). "
          "`worker_lost` carries `x-should-retry: false`: the job ended its workers, a retry would run it again.",
          {"x-should-retry": header("'false' on `worker_lost`: do not retry (OpenAI's clients obey it).",
                                    {"type": "string", "enum": ["false"]}, required=False)}),
    503: ("`audit_unavailable`, `queue_unavailable`, `usage_unavailable`, `auth_unavailable` or `cancelled`: "
          "a dependency is down, so the request was refused; nothing is served unaudited or uncounted. "
          "`policy_unavailable` (with `Retry-After`): no policy decision could be had in time (capacity, "
          "not permission). `model_unavailable` (with `Retry-After` and `x-should-retry: false`): the model has no "
          "live worker and its last worker could not load it; nothing was queued, and only an operator can mend it. "
          "`queue_lost` (with `Retry-After`): the job waited in a Redis that came back without its data; nothing "
          "was generated or charged.",
          {"Retry-After": _UNAVAILABLE_RETRY_AFTER,
           "x-should-retry": header("'false' on `model_unavailable`: an operator must act, an automatic retry "
                                    "only waits.", {"type": "string", "enum": ["false"]}, required=False)}),
    504: ("`timed_out`: no result within GOVGATE_REQUEST_TIMEOUT_S, or the worker's generation time limit hit "
          "(that one with `x-should-retry: false`).",
          {"x-should-retry": header("'false' when the generation time limit hit: do not retry unchanged.",
                                    {"type": "string", "enum": ["false"]}, required=False)}),
}
#: 401, as every route that needs a key answers it (a completion's may also end it in flight: above).
UNAUTHORIZED = ("`missing_api_key` or `invalid_api_key`: no key, malformed, unknown or revoked.",
                {"WWW-Authenticate": _CHALLENGE})
#: The errors of a route that only needs a key (``GET /v1/models``).
_KEY_ERRORS = {401: UNAUTHORIZED,
               403: ("`policy_error`: the policy's evaluation of which models this key may use failed (a rule "
                     "conflict, an error; the gateway's log names it).", {}),
               503: ("`auth_unavailable`: API keys cannot be checked (the database is down); "
                     "`policy_unavailable` (with `Retry-After`): the policy could not say in time which models "
                     "this key may use.", {"Retry-After": _UNAVAILABLE_RETRY_AFTER})}
#: ``GET /v1/models/{id}``: a model that does not exist and one this key may not use are answered alike.
_MODEL_ERRORS = {**{status: answer for status, answer in _KEY_ERRORS.items() if status != 403},
                 404: ("`model_not_found`: no such model, or one this key may not use, or one the policy cannot "
                       "say it may (answered alike).", {})}


def _error(description: str, headers: dict[str, OpenAPIHeader]) -> OpenAPIResponse:
    """An error answer: every one carries the request-id headers (README: "Every response, errors included")."""
    headers = {urls.REQUEST_ID_HEADER: _REQUEST_ID, "x-request-id": _OPENAI_REQUEST_ID, **headers}
    return OpenAPIResponse(description=description, headers=headers, content={
        JSON: OpenAPIMediaType(schema=JsonSchema(document=json_schema(shapes.ErrorResponse)))})


def error_responses(table: dict[int, tuple[str, dict[str, OpenAPIHeader]]]) -> dict[str, OpenAPIResponse]:
    """Status -> an error answer in OpenAI's shape, from ``{status: (description, headers)}``, by status;
    with :data:`HEAD_TOO_LARGE`, which every route answers."""
    statuses = sorted({431: HEAD_TOO_LARGE, **table}.items())
    return {str(status): _error(description, headers) for status, (description, headers) in statuses}


def _event_stream(chunk: type) -> dict[str, Any]:
    """One Server-Sent Event, as schemathesis and OpenAPI 3.2 read an event-stream schema.

    ``data`` is a chunk, an ``{"error": …}`` object for a failure after the
    stream started, or the final ``[DONE]``.
    """
    payload = {"anyOf": [json_schema(chunk), json_schema(shapes.ErrorResponse)]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string", "const": "message"},
            "data": {"if": {"const": "[DONE]"},
                     "else": {"contentMediaType": JSON, "contentSchema": payload}},
        },
    }


#: What a declared purpose may be (``gateway/requests/purpose.py``).
_LABEL = (f"a label of 1 to {MAX_PURPOSE_CHARS} printable characters (no control, format or separator character "
          "but the space), without leading or trailing space; anything else is 422 `invalid_value`.")
#: What the struct cannot say about a field (README's "Supported request fields").
_FIELD_NOTES = {
    "model": "A model of the registry (GET /v1/models lists those this key may use); 404 otherwise.",
    "messages": ("The conversation; `developer` is read as `system`. A conversation ending with an "
                 "assistant message is answered with a new assistant turn, as OpenAI's API does."),
    "prompt": "One prompt: a string, or a list holding exactly one string (batches are refused with 400).",
    "max_tokens": "Tokens to generate at most; the policy may clamp it (or refuse it). Defaults to "
                  "GOVGATE_DEFAULT_MAX_TOKENS, or the room the prompt leaves in the context if that is less.",
    "max_completion_tokens": "OpenAI's newer name for `max_tokens`.",
    "temperature": "0 is greedy decoding.",
    "repetition_penalty": "Defaults to the model's registry value.",
    "frequency_penalty": "llama.cpp models only: anything but 0 on a ctransformers model is a 400.",
    "presence_penalty": "llama.cpp models only: anything but 0 on a ctransformers model is a 400.",
    "stop": "A stop sequence or up to 4; the output ends before it (it is not included).",
    "stream": "Send Server-Sent Events (`text/event-stream`) instead of one JSON body.",
    "stream_options": "Only with `stream: true`; `include_usage` adds a last chunk with `usage`.",
    "n": "Choices per request: only 1 is supported (400 otherwise).",
    "metadata": (f"At most {MAX_METADATA_PAIRS} key-value pairs, keys of at most {MAX_METADATA_KEY_CHARS} "
                 f"characters, string values of at most {MAX_METADATA_VALUE_CHARS} (OpenAI's bounds; beyond them "
                 f"422 `invalid_value`). `metadata.purpose` declares the request's purpose to the policy: {_LABEL}"),
}


def _noted(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with :data:`_FIELD_NOTES` as the descriptions of its top-level properties."""
    properties = {name: {**definition, "description": _FIELD_NOTES[name]} if name in _FIELD_NOTES else definition
                  for name, definition in schema["properties"].items()}
    return {**schema, "properties": properties}


_PURPOSE = Parameter(name=urls.PURPOSE_HEADER, param_in="header", required=False,
                     schema=JsonSchema(document={"type": "string"}),
                     description=("Declares the request's purpose to the policy (as `metadata.purpose` does), "
                                  f"as UTF-8 text: {_LABEL} Given twice, or beside a different `metadata.purpose`: "
                                  "422 `invalid_value`."))

_EXAMPLES: dict[type, dict[str, Any]] = {
    ChatCompletionRequest: {"model": TINY_MODEL_NAME, "max_tokens": 16,
                            "messages": [{"role": "user", "content": "Say hello."}]},
    CompletionRequest: {"model": TINY_MODEL_NAME, "max_tokens": 16, "prompt": "Once upon a time"},
}


def completion_operation(request: type, response: type, chunk: type) -> type[Operation]:
    """An ``Operation`` class for one completion route (for the handler's ``operation_class=``)."""

    @dataclass
    class CompletionOperation(Operation):
        def __post_init__(self) -> None:
            self.parameters = [_PURPOSE]
            self.request_body = RequestBody(required=True, description=(
                "Validated against this schema by the gateway itself (the body is read raw so that a refused "
                "body is audited too). An unknown field is refused with 400 `unsupported_parameter`."),
                content={JSON: OpenAPIMediaType(schema=JsonSchema(document=_noted(json_schema(request))),
                                                example=_EXAMPLES[request])})
            self.responses = {
                "200": OpenAPIResponse(
                    description=("The completion; with `\"stream\": true` a `text/event-stream` of chunk objects "
                                 "as `data:` lines, ending with `data: [DONE]`."),
                    headers={urls.REQUEST_ID_HEADER: _REQUEST_ID,
                             urls.OPENAI_REQUEST_ID_HEADER: _OPENAI_REQUEST_ID},
                    content={JSON: OpenAPIMediaType(schema=JsonSchema(document=json_schema(response))),
                             _SSE: OpenAPIMediaType(schema=JsonSchema(document=_event_stream(chunk)))}),
                **error_responses(_COMPLETION_ERRORS),
            }

    return CompletionOperation


def _json_operation(body: type, description: str, errors: dict[str, OpenAPIResponse]) -> type[Operation]:
    @dataclass
    class JsonOperation(Operation):
        def __post_init__(self) -> None:
            self.responses = {"200": OpenAPIResponse(description=description, content={
                JSON: OpenAPIMediaType(schema=JsonSchema(document=json_schema(body)))}), **errors}

    return JsonOperation


CHAT_OPERATION = completion_operation(ChatCompletionRequest, shapes.ChatCompletion, shapes.ChatCompletionChunk)
COMPLETION_OPERATION = completion_operation(CompletionRequest, shapes.TextCompletion, shapes.TextCompletionChunk)
MODELS_OPERATION = _json_operation(shapes.ModelList, "The models this key may use.", error_responses(_KEY_ERRORS))
MODEL_OPERATION = _json_operation(shapes.Model, "One model this key may use.", error_responses(_MODEL_ERRORS))
HEALTH_OPERATION = _json_operation(shapes.Health, "The process is up and serving HTTP.", error_responses({}))
#: ``/readyz`` and ``/metrics`` need no credential; one given must get the per-model view (operator_view.py).
_OPERATOR_ERRORS = {
    401: ("`missing_api_key` or `invalid_api_key`: an Authorization header that is neither "
          "GOVGATE_METRICS_TOKEN nor a known key (send none for the answer without model names).",
          {"WWW-Authenticate": _CHALLENGE}),
    403: ("`admin_forbidden`: a key without the `admin` role asked for the per-model view.", {}),
}
READY_OPERATION = _json_operation(shapes.Readiness, "Database, Redis, policy and a worker for every model are "
                                  "reachable (models named only to an admin key or GOVGATE_METRICS_TOKEN).", {
    "503": OpenAPIResponse(
        description="Something a request needs is missing; `missing` names it and `checks` says why.",
        content={JSON: OpenAPIMediaType(schema=JsonSchema(document=json_schema(shapes.Readiness)))}),
    **error_responses(_OPERATOR_ERRORS)})


@dataclass
class MetricsOperation(Operation):
    """``GET /metrics``: Prometheus's text exposition format, not JSON."""

    def __post_init__(self) -> None:
        self.responses = {"200": OpenAPIResponse(
            description="This gateway process's metrics, and queue depth and live workers read from Redis, in "
                        "Prometheus's text format (README, \"Monitoring\"); per model only for an admin key or "
                        "GOVGATE_METRICS_TOKEN, else summed over the models.",
            content={"text/plain; version=0.0.4; charset=utf-8": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))}),
            **error_responses(_OPERATOR_ERRORS)}

