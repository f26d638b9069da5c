"""Streaming: Server-Sent Events in OpenAI's chunk format, and cancellation on disconnect."""

from __future__ import annotations

import json
import time

import httpx
import openai

from tests.conftest import bearer
from workers.contract.registry import TINY_MODEL_NAME

HELLO = [{"role": "user", "content": "Hello"}]


def sse_documents(lines):
    """The JSON documents of an SSE body as they arrive; the final [DONE] as the string 'DONE'."""
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield "DONE" if payload == "[DONE]" else json.loads(payload)


def test_openai_client_streams_the_same_text_as_a_plain_request(served_api, keyring, audit_store):
    client = openai.OpenAI(base_url=f"{served_api}/v1", api_key=keyring["analyst"], max_retries=0)
    # 200 tokens: far more text than the output rules' hold-back (64 characters), and long enough that
    # even a fast machine's worker sends it in several pieces (GOVGATE_STREAM_FLUSH_INTERVAL_MS, 10 ms
    # apart), so the stream is released in several windows; a 20-token answer fits in one.
    plain = client.chat.completions.create(model=TINY_MODEL_NAME, messages=HELLO, max_tokens=200, temperature=0)
    chunks = list(client.chat.completions.create(model=TINY_MODEL_NAME, messages=HELLO, max_tokens=200,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really incremental
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage.completion_tokens == 200 and chunks[-1].choices == []
    request_id = chunks[0].id.removeprefix("chatcmpl-")
    entries = audit_store.entries_for(request_id)
    assert [e.kind for e in entries] == ["request", "completion"]
    assert entries[0].body["stream"] is True
    assert entries[1].payload["output"] == text  # the audit holds the whole output


def test_text_completion_stream_ends_with_done(served_api, keyring):
    with httpx.stream("POST", f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                      json={"model": TINY_MODEL_NAME, "prompt": "Once", "max_tokens": 6, "temperature": 0,
                            "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        documents = list(sse_documents(response.iter_lines()))
    assert documents[-1] == "DONE"
    chunks = documents[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks).strip()


def test_stream_errors_before_generation_are_plain_http_errors(served_api, keyring):
    response = httpx.post(f"{served_api}/v1/chat/completions", headers=bearer(keyring["analyst"]), timeout=30,
                          json={"model": TINY_MODEL_NAME, "stream": True,
                                "messages": [{"role": "user", "content": "card 4111 1111 1111 1111"}]})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "policy_denied"
    hidden = httpx.post(f"{served_api}/v1/chat/completions", headers=bearer(keyring["viewer"]), timeout=30,
                        json={"model": TINY_MODEL_NAME, "messages": HELLO, "stream": True})
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"


def test_disconnect_cancels_generation_and_records_the_partial_output(served_api, keyring, audit_store):
    max_tokens = 4000
    received = ""
    with httpx.stream("POST", f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=60,
                      json={"model": TINY_MODEL_NAME, "prompt": "Tell", "max_tokens": max_tokens,
                            "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200
        request_id = response.headers["x-govgate-request-id"]
        for document in sse_documents(response.iter_lines()):
            received += document["choices"][0]["text"]
            if len(received) > 20:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    terminal = None
    while terminal is None and time.monotonic() < deadline:
        terminal = audit_store.terminal_for(request_id)
        time.sleep(0.1)
    assert terminal is not None, "the abandoned request never got its terminal entry"
    assert terminal.kind == "cancelled"
    assert 0 < terminal.body["usage"]["completion_tokens"] < max_tokens
    assert terminal.payload["output"].startswith(received)
    # The worker was freed: the next request is served.
    after = httpx.post(f"{served_api}/v1/completions", headers=bearer(keyring["admin"]), timeout=30,
                       json={"model": TINY_MODEL_NAME, "prompt": "Once", "max_tokens": 3})
    assert after.status_code == 200
