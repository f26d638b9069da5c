"""Every kind of bad input gets its designed status and an OpenAI-shaped error.

None of them may produce a 500 or reach a worker; those from a known
principal are recorded as ``rejected`` audit entries.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import bearer
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio

OK_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(module_client):
    """The module's one app (``module_client``): its tests share nothing through the app's state."""
    return module_client


def chat(**fields) -> bytes:
    return json.dumps({"model": TINY_MODEL_NAME, "messages": OK_MESSAGES, **fields}).encode()


def nested(depth: int, where: str) -> bytes:
    """A chat body with arrays/objects nested ``depth`` deep at ``where`` (built as text: json.dumps would recurse)."""
    deep = (b'{"a":[' * (depth // 2)) + b"1" + (b"]}" * (depth // 2))
    if where == "content":
        return b'{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (TINY_MODEL_NAME.encode(), deep)
    return chat()[:-1] + b', "%s": %s}' % (where.encode(), deep)


BAD_BODIES = [
    # (case id, raw body, status, code, param)
    ("not-json", b"{model: nope", 400, "invalid_json", None),
    ("empty-body", b"", 400, "invalid_json", None),
    ("json-array", b"[1, 2]", 400, "invalid_json", None),
    ("json-string", b'"hello"', 400, "invalid_json", None),
    ("invalid-utf8", b'{"model": "\xff\xfe"}', 400, "invalid_json", None),
    ("missing-messages", json.dumps({"model": TINY_MODEL_NAME}).encode(), 422, "invalid_value", "messages"),
    ("missing-model", json.dumps({"messages": OK_MESSAGES}).encode(), 422, "invalid_value", "model"),
    ("empty-messages", chat(messages=[]), 422, "invalid_value", "messages"),
    ("messages-not-list", chat(messages="hello"), 422, "invalid_value", "messages"),
    ("message-not-object", chat(messages=["hello"]), 422, "invalid_value", "messages[0]"),
    ("bad-role", chat(messages=[{"role": "wizard", "content": "x"}]), 422, "invalid_value", "messages[0].role"),
    ("content-number", chat(messages=[{"role": "user", "content": 5}]), 422, "invalid_value",
     "messages[0].content"),
    ("content-null", chat(messages=[{"role": "user", "content": None}]), 422, "invalid_value",
     "messages[0].content"),
    ("max-tokens-zero", chat(max_tokens=0), 422, "invalid_value", "max_tokens"),
    ("max-tokens-negative", chat(max_tokens=-5), 422, "invalid_value", "max_tokens"),
    ("max-tokens-string", chat(max_tokens="10"), 422, "invalid_value", "max_tokens"),
    ("max-tokens-float", chat(max_tokens=1.5), 422, "invalid_value", "max_tokens"),
    ("temperature-too-high", chat(temperature=7), 422, "invalid_value", "temperature"),
    ("top-p-zero", chat(top_p=0), 422, "invalid_value", "top_p"),
    ("model-number", chat(model=42), 422, "invalid_value", "model"),
    ("too-many-stops", chat(stop=["a", "b", "c", "d", "e"]), 422, "invalid_value", "stop"),
    ("unknown-field", chat(frobnicate=True), 400, "unsupported_parameter", "frobnicate"),
    ("logprobs-true", chat(logprobs=True), 400, "unsupported_parameter", "logprobs"),
    ("top-logprobs", chat(top_logprobs=3), 400, "unsupported_parameter", "top_logprobs"),
    ("json-schema", chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
     "unsupported_parameter", "response_format"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter", "tools"),
    ("message-tool-calls", chat(messages=[{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]},
                                          *OK_MESSAGES]), 400, "unsupported_parameter", "messages[0].tool_calls"),
    ("n-two", chat(n=2), 400, "unsupported_parameter", "n"),
    ("nested-1000-in-unknown-field", nested(1000, "extra"), 400, "invalid_json", None),
    ("nested-1000-in-metadata", nested(1000, "metadata"), 400, "invalid_json", None),
    ("nested-1000-in-content", nested(1000, "content"), 400, "invalid_json", None),
    ("nested-100000", nested(100000, "extra"), 400, "invalid_json", None),
    ("nested-66", nested(66, "extra"), 400, "invalid_json", None),
    ("nested-60-is-parsed", nested(60, "extra"), 400, "unsupported_parameter", "extra"),  # under the limit
    ("lone-surrogate", b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
     % TINY_MODEL_NAME.encode(), 400, "invalid_json", None),
    ("max-tokens-2-53", chat(max_tokens=2**53), 422, "invalid_value", "max_tokens"),
    # numbers msgspec cannot hold: they were 400 invalid_json ("Number out of range - at `$[...]`")
    ("max-tokens-1e400", chat()[:-1] + b', "max_tokens": 1e400}', 422, "invalid_value", "max_tokens"),
    ("max-tokens-5000-digits", chat()[:-1] + b', "max_tokens": ' + b"9" * 5000 + b"}", 422, "invalid_value",
     "max_tokens"),
    ("text-part-minus-1e999", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "PLACE"}]}])
     .replace(b'"PLACE"', b"-1e999"), 422, "invalid_value", "messages[0].content[0].text"),
    ("extra-1e400", chat()[:-1] + b', "extra": 1e400}', 422, "invalid_value", "extra"),
    # a name given twice is named by its path (it was the bare name, "role")
    ("role-twice", chat(messages=[{"role": "user", "content": "x", "ROLE": "user"}]).replace(b'"ROLE"', b'"role"'),
     400, "invalid_json", "messages[0].role"),
    ("purpose-twice", chat(metadata={"purpose": "a", "PURPOSE": "b"}).replace(b'"PURPOSE"', b'"purpose"'),
     400, "invalid_json", "metadata.purpose"),
    ("max-tokens-10-24", chat(max_tokens=10**24), 422, "invalid_value", "max_tokens"),
    ("max-completion-tokens-2-53", chat(max_completion_tokens=2**53), 422, "invalid_value", "max_completion_tokens"),
    ("n-10-24", chat(n=10**24), 422, "invalid_value", "n"),
    ("top-k-2-53", chat(top_k=2**53), 422, "invalid_value", "top_k"),
    ("seed-10-24", chat(seed=10**24), 422, "invalid_value", "seed"),
    # valid OpenAI values govgate cannot honour: 400 unsupported_parameter, as tools are (they were 422)
    ("image-part", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "unsupported_parameter", "messages[0].content[0].type"),
    ("tool-message", chat(messages=[OK_MESSAGES[0], {"role": "tool", "content": "4", "tool_call_id": "1"},
                                    *OK_MESSAGES]), 400, "unsupported_parameter", "messages[1].role"),
    ("made-up-role", chat(messages=[{"role": "robot", "content": "x"}]), 422, "invalid_value", "messages[0].role"),
    ("unknown-model", chat(model="no-such-model"), 404, "model_not_found", "model"),
    # govgate-tiny is served by ctransformers, whose C API takes NUL-terminated text
    ("nul-in-content", chat(messages=[{"role": "user", "content": "a\x00b"}]), 422, "invalid_value",
     "messages[0].content"),
    ("nul-in-a-later-part", chat(messages=[OK_MESSAGES[0], {"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "text", "text": "\x00"}]}]), 422, "invalid_value",
     "messages[1].content"),
]


@pytest.mark.parametrize("raw,status,code,param", [case[1:] for case in BAD_BODIES],
                         ids=[case[0] for case in BAD_BODIES])
async def test_bad_chat_body(client, keyring, audit_store, raw, status, code, param):
    before = audit_store.head()
    response = await client.post("/v1/chat/completions", content=raw,
                                 headers={**bearer(keyring["analyst"]), "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"] and error["type"]
    # Recorded as a rejection by the known principal, and nothing else happened.
    new = [e for e in audit_store.tail(5) if (before is None or e.seq > before.seq) and e.kind != "chain_format"]
    assert [e.kind for e in new] == ["rejected"]
    assert new[0].principal == "alice"
    assert new[0].body["error"]["code"] == code
    assert new[0].body["body_bytes"] == len(raw)
    # A field name the gateway knows stays in the entry; one the client made up is its text ("…").
    assert new[0].body["error"]["param"] == (param if param not in ("frobnicate", "extra") else "…")


#: A made-up field whose name holds what a detector would find: the client wrote it, as it writes a prompt.
SECRET_NAME = "ZQX my SSN is 987-65-4321"


@pytest.mark.parametrize("raw,param,kept", [
    (chat(**{SECRET_NAME: 1}), SECRET_NAME, "…"),
    (chat(messages=[{"role": "user", "content": "x", SECRET_NAME: 1}]), f"messages[0].{SECRET_NAME}", "messages[0].…"),
    (chat(stream_options={SECRET_NAME: True}), f"stream_options.{SECRET_NAME}", "stream_options.…"),
], ids=["top-level", "in-a-message", "in-stream-options"])
async def test_an_unknown_fields_name_reaches_the_client_but_not_the_audit_log(client, keyring, audit_store, raw,
                                                                              param, kept):
    # The rejected entry kept it in clear, in the chained body that prune cannot erase, at every prompt_logging
    # level: a refused body keeps no text, and a key of the body is text the client wrote.
    before = audit_store.head()
    response = await client.post("/v1/chat/completions", content=raw,
                                 headers={**bearer(keyring["analyst"]), "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", param)
    assert SECRET_NAME in error["message"]  # the client is told what it sent
    new = [e for e in audit_store.tail(5) if (before is None or e.seq > before.seq) and e.kind != "chain_format"]
    assert [e.kind for e in new] == ["rejected"]
    assert new[0].body["error"] == {"code": "unsupported_parameter", "param": kept,
                                    "message": "Unsupported parameter: '…' is not accepted by this gateway."}
    assert "987-65-4321" not in json.dumps(new[0].body) and "ZQX" not in json.dumps(new[0].body)


async def test_a_lone_surrogate_escape_is_named_not_called_a_truncated_body(client, keyring):
    """msgspec calls a high surrogate escape without its low half "Input data was truncated"."""
    raw = dict((case[0], case[1]) for case in BAD_BODIES)["lone-surrogate"]
    response = await client.post("/v1/chat/completions", content=raw,
                                 headers={**bearer(keyring["analyst"]), "Content-Type": "application/json"})
    message = response.json()["error"]["message"]
    assert "truncated" not in message and "\\uD800-\\uDBFF escape must be followed by its low surrogate" in message
    # An escaped backslash before "ud800" is text, not an escape: that body is fine as JSON.
    fine = raw.replace(b"\\ud800", b"\\\\ud800")
    assert fine != raw
    response = await client.post("/v1/chat/completions", content=fine,
                                 headers={**bearer(keyring["analyst"]), "Content-Type": "application/json"})
    assert response.json().get("error", {}).get("code") != "invalid_json", response.text


@pytest.mark.parametrize("raw,status,code", [
    (b'{"model": "%s", "prompt": "x", "max_tokens": %d}' % (TINY_MODEL_NAME.encode(), 10**24), 422, "invalid_value"),
    (b'{"model": "%s", "prompt": "x", "logprobs": 0}' % TINY_MODEL_NAME.encode(), 400, "unsupported_parameter"),
    (b'{"model": "%s", "prompt": "x", "echo": true}' % TINY_MODEL_NAME.encode(), 400, "unsupported_parameter"),
    (b'{"model": "%s", "prompt": %s}' % (TINY_MODEL_NAME.encode(), b"[" * 500 + b"]" * 500), 400, "invalid_json"),
    (b'{"model": "%s", "prompt": "a\\u0000b"}' % TINY_MODEL_NAME.encode(), 422, "invalid_value"),
    (b'{"model": "%s", "prompt": 12}' % TINY_MODEL_NAME.encode(), 422, "invalid_value"),
    (b'{"model": "%s", "prompt": ["a", "b"]}' % TINY_MODEL_NAME.encode(), 400, "unsupported_parameter"),
    (b'{"model": "%s"}' % TINY_MODEL_NAME.encode(), 422, "invalid_value"),
    (b'{"model": "%s", "prompt": "x", "max_tokens": 0}' % TINY_MODEL_NAME.encode(), 422, "invalid_value"),
    # a name given twice: served last-wins, while a proxy or log before the gateway may read the first (the
    # second model was served; a repeated metadata.purpose got past the check against the purpose header)
    (b'{"model": "nope", "model": "%s", "prompt": "x"}' % TINY_MODEL_NAME.encode(), 400, "invalid_json"),
    (b'{"model": "%s", "prompt": "x", "metadata": {"purpose": "a", "purpose": "b"}}' % TINY_MODEL_NAME.encode(),
     400, "invalid_json"),
    # positive, but below a C float's smallest normal value: llama.cpp refused it in the worker (a 502)
    (b'{"model": "%s", "prompt": "x", "repetition_penalty": 1e-39}' % TINY_MODEL_NAME.encode(), 422, "invalid_value"),
])
async def test_bad_completion_body(client, keyring, raw, status, code):
    response = await client.post("/v1/completions", content=raw, headers=bearer(keyring["admin"]))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


async def test_body_over_the_limit_is_413_and_audited(client, keyring, settings, audit_store):
    huge = chat(messages=[{"role": "user", "content": "x" * (settings.max_body_bytes + 10)}])
    response = await client.post("/v1/chat/completions", content=huge, headers=bearer(keyring["analyst"]))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    latest = audit_store.tail(1)[0]
    assert latest.kind == "rejected" and latest.body["error"]["code"] == "body_too_large"


async def test_prompt_longer_than_the_context_is_refused_before_queueing(client, keyring, audit_store, settings):
    """The gateway counts with the model's own tokenizer: nothing too long is ever queued."""
    from tests.gateway.test_fail_closed import queued
    from workers.backends import load_model
    from workers.contract.prompts import render_chat
    from workers.contract.registry import load_registry

    spec = load_registry(settings.models_file, settings.var_dir).get(TINY_MODEL_NAME)
    model = load_model(spec)
    cases = [
        ([{"role": "user", "content": " ".join(["gate"] * 6000)}], 16),  # the prompt alone is too long
        ([{"role": "user", "content": "Hello there"}], spec.context_length - 5),  # prompt + max_tokens is
    ]
    for messages, max_tokens in cases:
        before = queued(settings, TINY_MODEL_NAME)
        response = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                     json={"model": TINY_MODEL_NAME, "messages": messages, "max_tokens": max_tokens})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        entry = audit_store.tail(1)[0]
        assert entry.kind == "request" and audit_store.terminal_for(entry.request_id) is None
        assert entry.body["admission"]["code"] == "context_length_exceeded"
        exact = model.count_tokens(render_chat(messages, spec.prompt_format)[0])
        assert entry.body["admission"]["prompt_tokens"] == exact  # the gateway's count is the model's
        assert f"{exact} tokens" in error["message"]
        assert queued(settings, TINY_MODEL_NAME) == before


async def test_a_prompt_that_just_fits_is_served(client, keyring, settings):
    from workers.backends import load_model
    from workers.contract.prompts import render_chat
    from workers.contract.registry import load_registry

    spec = load_registry(settings.models_file, settings.var_dir).get(TINY_MODEL_NAME)
    messages = [{"role": "user", "content": "Hello there"}]
    exact = load_model(spec).count_tokens(render_chat(messages, spec.prompt_format)[0])
    response = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                 json={"model": TINY_MODEL_NAME, "messages": messages,
                                       "max_tokens": spec.context_length - exact, "stop": ["Zq"]})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == exact


def _messages_of(spec, model, low: int, high: int) -> tuple[list[dict[str, str]], int]:
    """User messages whose rendered prompt is between ``low`` and ``high`` tokens, and that count."""
    from workers.contract.prompts import render_chat

    words = 1
    while True:
        messages = [{"role": "user", "content": " ".join(["gate"] * words)}]
        count = model.count_tokens(render_chat(messages, spec.prompt_format)[0])
        if low <= count <= high:
            return messages, count
        assert count < low, f"{words} words gave {count} tokens, past {high}"
        words += max(1, (low - count) // 3)


async def test_without_max_tokens_a_prompt_that_fits_runs_to_the_contexts_end(client, keyring, settings,
                                                                             audit_store):
    """OpenAI's API runs a left-out max_tokens to the end of the context: the default (128) never refuses a
    prompt that fits; a prompt that fills the context is refused naming the prompt, not max_tokens."""
    from workers.backends import load_model
    from workers.contract.registry import load_registry

    spec = load_registry(settings.models_file, settings.var_dir).get(TINY_MODEL_NAME)
    model = load_model(spec)
    default = settings.default_max_tokens
    messages, exact = _messages_of(spec, model, spec.context_length - default + 20, spec.context_length - 20)
    room = spec.context_length - exact
    assert 1 <= room < default
    response = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                 json={"model": TINY_MODEL_NAME, "messages": messages})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == exact and usage["completion_tokens"] <= room
    request = next(e for e in audit_store.entries_for(response.headers["x-govgate-request-id"]) if e.kind == "request")
    assert request.body["params"]["max_tokens"] == room
    assert request.body["admission"]["reserved_tokens"] >= exact + room
    # A client's own max_tokens is still held to: the same prompt asking the default is refused, naming it.
    asked = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                              json={"model": TINY_MODEL_NAME, "messages": messages, "max_tokens": default})
    assert asked.status_code == 400 and asked.json()["error"]["param"] == "max_tokens"
    # A prompt that leaves no room at all: refused, and the error names the prompt.
    full, count = _messages_of(spec, model, spec.context_length, spec.context_length + 200)
    refused = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                json={"model": TINY_MODEL_NAME, "messages": full})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"{count} tokens" in error["message"] and "max_tokens" not in error["message"]
    text = await client.post("/v1/completions", headers=bearer(keyring["admin"]),
                             json={"model": TINY_MODEL_NAME, "prompt": full[0]["content"] * 2})
    assert text.status_code == 400 and text.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("headers,code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer"}, "invalid_api_key"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key"),
    ({"Authorization": "Bearer gk_000000000000_" + "A" * 43}, "invalid_api_key"),
    ({"Authorization": "Bearer not-a-key"}, "invalid_api_key"),
    ({"Authorization": "Bearer " + "x" * 5000}, "invalid_api_key"),
])
async def test_missing_or_unknown_key_is_401(client, audit_store, headers, code):
    before = audit_store.head()
    response = await client.post("/v1/chat/completions", content=chat(), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "authentication_error"
    assert audit_store.head() == before  # no principal, nothing to attribute


@pytest.mark.parametrize("second", ["admin", "garbage"])
async def test_two_authorization_headers_are_401_whichever_comes_first(client, audit_store, keyring, second):
    other = bearer(keyring["admin"])["Authorization"] if second == "admin" else "Bearer garbage"
    before = audit_store.head()
    for pair in ([bearer(keyring["admin"])["Authorization"], other], [other, bearer(keyring["admin"])["Authorization"]]):
        response = await client.get("/v1/models", headers=[("Authorization", value) for value in pair])
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert audit_store.head() == before


async def test_revoked_key_is_401(client, keyring):
    response = await client.post("/v1/chat/completions", content=chat(), headers=bearer(keyring["revoked"]))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


async def test_models_needs_a_key(client):
    response = await client.get("/v1/models")
    assert response.status_code == 401


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/chat/completions", 405),
    ("POST", "/v1/nowhere", 404),
    ("DELETE", "/v1/models", 405),
])
async def test_routing_errors_are_openai_shaped(client, keyring, method, path, status):
    response = await client.request(method, path, headers=bearer(keyring["admin"]))
    assert response.status_code == status
    assert set(response.json()["error"]) >= {"message", "type", "code"}


HARMLESS_DEFAULTS = [
    # (case id, extra fields) — each asks for exactly what govgate does anyway
    ("logprobs-false", {"logprobs": False, "top_logprobs": None}),
    ("top-logprobs-zero", {"top_logprobs": 0}),
    ("response-format-text", {"response_format": {"type": "text"}}),
    ("stream-options-null", {"stream_options": None}),
    ("stream-options-without-stream", {"stream_options": {"include_usage": True}}),  # usage is always returned
    ("n-one-and-user", {"n": 1, "user": "someone@example.org"}),
    ("no-tools", {"tools": [], "tool_choice": "none", "parallel_tool_calls": None, "functions": None,
                  "function_call": "none"}),
    ("other-defaults", {"logit_bias": {}, "service_tier": "auto", "store": False, "modalities": ["text"],
                        "prediction": None, "audio": None, "reasoning_effort": None}),
    ("echoed-assistant-message", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "refusal": None, "tool_calls": None, "function_call": None,
         "audio": None, "annotations": []},
        {"role": "user", "content": "and?"}]}),
    ("max-tokens-at-the-bound", {"max_tokens": 2**31 - 1}),  # the policy clamps it
    ("assistant-last", {"messages": [{"role": "user", "content": "Name a fruit."},
                                     {"role": "assistant", "content": "A fruit I like is"}]}),  # OpenAI answers it
]


@pytest.mark.parametrize("extra", [case[1] for case in HARMLESS_DEFAULTS], ids=[case[0] for case in HARMLESS_DEFAULTS])
async def test_harmless_openai_defaults_are_served(client, keyring, audit_store, extra):
    fields = {"max_tokens": 3, **extra}
    response = await client.post("/v1/chat/completions", content=chat(**fields), headers=bearer(keyring["analyst"]))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    kinds = [e.kind for e in audit_store.entries_for(response.headers["x-govgate-request-id"])]
    assert kinds == ["request", "completion"]


async def test_harmless_completion_defaults_are_served(client, keyring):
    body = {"model": TINY_MODEL_NAME, "prompt": "The gate", "max_tokens": 3, "logprobs": None, "echo": False,
            "best_of": 1, "suffix": None, "n": 1, "user": "u"}
    response = await client.post("/v1/completions", json=body, headers=bearer(keyring["admin"]))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]


def test_depth_scan_ignores_brackets_in_strings():
    from gateway.requests.parsing import MAX_JSON_DEPTH, json_depth

    inside = json.dumps({"messages": [{"content": "[{" * 5000 + '\\"[' * 100}]}).encode()
    assert json_depth(inside) == 3
    assert json_depth(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)) == MAX_JSON_DEPTH + 1
    assert json_depth(b'["\\\\", ' + b"[" * 70 + b"]" * 70 + b"]") == 71


async def test_a_nul_is_refused_before_queueing_and_served_where_the_backend_takes_it(client, keyring, settings,
                                                                                      audit_store):
    from dataclasses import replace

    from gateway.requests.parsing import parse_body
    from gateway.requests.schemas import ChatCompletionRequest
    from gateway.requests.fit import check_fits
    from tests.gateway.test_fail_closed import queued
    from workers.contract.registry import BACKEND_LLAMACPP, load_registry

    before = queued(settings, TINY_MODEL_NAME)
    response = await client.post("/v1/chat/completions", headers=bearer(keyring["admin"]),
                                 json={"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "\x00"}]})
    assert response.status_code == 422, response.text
    assert "U+0000" in response.json()["error"]["message"]
    assert audit_store.tail(1)[0].kind == "rejected"
    assert queued(settings, TINY_MODEL_NAME) == before
    # The same prompt for a llama.cpp model passes the gateway's checks (the backend serves it:
    # tests/workers/backends/test_llamacpp.py::test_a_nul_in_the_prompt_is_served).
    spec = replace(load_registry(settings.models_file, settings.var_dir).get(TINY_MODEL_NAME), backend=BACKEND_LLAMACPP)
    request = parse_body(b'{"model": "x", "messages": [{"role": "user", "content": "a\\u0000b"}]}',
                         ChatCompletionRequest)
    check_fits(request, spec)
