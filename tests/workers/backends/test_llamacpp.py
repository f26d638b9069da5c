"""The llama.cpp backend's own machinery (xllamacpp) on the real tiny model: no mocks, the real C++ server.

What every backend promises is in ``test_backend_contract.py``; here are the
loopback listener, forking, llama.cpp's stream format and what it accepts
that ctransformers does not. The same tiny GGUF is loaded by ctransformers
too, so several tests check that both backends agree: same tokens, same
greedy text, same repetition penalty.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT
from tests.conftest_models import TINY_CONTEXT, tiny_model_path, tiny_spec  # noqa: F401 - fixtures
from tests.workers.backends.prompt import GREEDY, PROMPT
from workers.backends import (
    BackendError,
    SamplingParams,
    load_model,
)
from workers.backends.ctransformers_backend import CTransformersModel
from workers.backends.llamacpp_backend import LlamaCppModel, token_pieces
from workers.contract.registry import BACKEND_LLAMACPP, ModelSpec
from workers.tinymodel import EOS_ID


@pytest.fixture(scope="module")
def llama_spec(tiny_spec: ModelSpec) -> ModelSpec:
    return replace(tiny_spec, name="tiny-llamacpp", backend=BACKEND_LLAMACPP)


@pytest.fixture(scope="module")
def model(llama_spec: ModelSpec) -> LlamaCppModel:
    loaded = load_model(llama_spec)
    assert isinstance(loaded, LlamaCppModel)
    return loaded


@pytest.fixture(scope="module")
def ctransformers_model(tiny_spec: ModelSpec) -> CTransformersModel:
    loaded = load_model(tiny_spec)
    assert isinstance(loaded, CTransformersModel)
    return loaded


@pytest.fixture(scope="module")
def greedy_text(model: LlamaCppModel) -> str:
    return model.generate(PROMPT, GREEDY).text


# --- loading ---------------------------------------------------------------


def test_the_loopback_listener_refuses_requests_without_the_key(model: LlamaCppModel) -> None:
    """llama.cpp's own HTTP server must not be a way around the gateway."""
    address = urlsplit(model._server.listening_address)
    assert address.hostname == "127.0.0.1"
    for path, body in (("/completion", {"prompt": "the gate", "n_predict": 4}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/tokenize", {"content": "the gate"})):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
        try:
            connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            assert connection.getresponse().status == 401, path
        finally:
            connection.close()


def test_importing_the_backend_starts_nothing() -> None:
    """A fresh interpreter: importing the module imports no native library and starts no thread."""
    script = (
        "import os, sys, threading\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "import workers.backends, workers.backends.llamacpp_backend\n"
        "print(before, len(os.listdir('/proc/self/task')), threading.active_count(), 'xllamacpp' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    before, after, python_threads, imported = out.stdout.split()
    assert before == after == python_threads == "1"
    assert imported == "False"


FORK_SCRIPT = """
import json, os, sys
from pathlib import Path
from workers.backends import SamplingParams, load_model
from workers.contract.registry import ModelSpec

spec = ModelSpec(name="forked", path=Path(sys.argv[1]), backend="llama.cpp", context_length=int(sys.argv[2]))
texts = []
for _ in range(2):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            text = load_model(spec).generate(sys.argv[3], SamplingParams(max_tokens=40, temperature=0)).text
            os.write(write_end, json.dumps(text).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    texts.append(json.loads(data) if data else None)
print(json.dumps({"texts": texts, "parent_imported_xllamacpp": "xllamacpp" in sys.modules,
                  "parent_tasks": len(os.listdir("/proc/self/task"))}))
"""


@pytest.mark.timeout(180)
def test_children_forked_from_a_parent_that_never_loaded_generate(tiny_model_path: Path, greedy_text: str) -> None:
    """How workers use the backend: import in the parent, fork, load in each child.

    Run in a fresh interpreter because this test process has run inference
    already, and forking after inference is exactly what hangs llama.cpp.
    """
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(tiny_model_path), str(TINY_CONTEXT), PROMPT],
                         cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["texts"] == [greedy_text, greedy_text]
    assert report["parent_imported_xllamacpp"] is False
    assert report["parent_tasks"] == 1


# --- generation ------------------------------------------------------------


def test_greedy_is_the_same_text_as_ctransformers(greedy_text: str, ctransformers_model: CTransformersModel) -> None:
    assert greedy_text == ctransformers_model.generate(PROMPT, GREEDY).text
    assert len(greedy_text.split()) >= 10


def test_repetition_penalty_matches_ctransformers(model: LlamaCppModel, ctransformers_model: CTransformersModel,
                                                  greedy_text: str) -> None:
    params = SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.3)
    penalised = model.generate(PROMPT, params).text
    assert penalised == ctransformers_model.generate(PROMPT, params).text
    assert penalised != greedy_text


def test_registry_repetition_penalty_is_the_default(llama_spec: ModelSpec, model: LlamaCppModel) -> None:
    """``repetition_penalty`` in the registry applies when the request gives none (1.0)."""
    penalised = load_model(replace(llama_spec, repetition_penalty=1.3))
    assert penalised.generate(PROMPT, GREEDY).text == model.generate(
        PROMPT, SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.3)).text
    explicit = SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.1)
    assert penalised.generate(PROMPT, explicit).text == model.generate(PROMPT, explicit).text


def test_end_of_sequence_ends_with_stop_and_is_not_counted(model: LlamaCppModel,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Force end-of-sequence (the tiny model never picks it) and watch the backend drop it."""
    body = model.request_body
    monkeypatch.setattr(model, "request_body",
                        lambda tokens, params: {**body(tokens, params), "logit_bias": [[EOS_ID, 1e6]]})
    result = model.generate(PROMPT, GREEDY)
    assert (result.text, result.completion_tokens, result.finish_reason) == ("", 0, "stop")


# --- tokenizer -------------------------------------------------------------


@pytest.mark.parametrize("text", ["the gate", PROMPT, "é€🎉" * 10, "tabs\tand\nlines", "  spaced  out  "])
def test_tokens_match_ctransformers(model: LlamaCppModel, ctransformers_model: CTransformersModel, text: str) -> None:
    assert model.tokenize(text) == ctransformers_model.tokenize(text)


def test_a_nul_in_the_prompt_is_served(model: LlamaCppModel, llama_spec: ModelSpec) -> None:
    """llama.cpp takes any character, so the gateway lets a NUL through for its models (ctransformers cannot)."""
    from workers.contract.tokenizers import load_tokenizer

    text = "open\x00the gate"
    run = model.generate(text, SamplingParams(max_tokens=3, temperature=0))
    assert run.completion_tokens == 3 and run.text
    assert run.prompt_tokens == model.count_tokens(text) == load_tokenizer(llama_spec).count(text)


def test_special_token_text_stays_text(model: LlamaCppModel) -> None:
    """A user typing ``</s>`` must not end the prompt's sequence early."""
    ids = model.tokenize("a </s> b")
    assert ids[0] == 1 and EOS_ID not in ids


# --- chunks to tokens (llama.cpp's stream format, written out) -------------


def _chunk(text: str, so_far: int, finish: str | None = None) -> dict:
    return {"choices": [{"text": text, "index": 0, "finish_reason": finish}], "timings": {"predicted_n": so_far}}


def test_token_pieces_splits_folded_tokens_and_drops_end_of_sequence() -> None:
    chunks = [_chunk(" a", 1), _chunk("é", 3), _chunk("", 4), _chunk("", 4, "stop")]
    assert list(token_pieces(chunks)) == [b" a", b"", "é".encode()]


def test_token_pieces_keeps_the_last_token_at_the_limit() -> None:
    chunks = [_chunk(" a", 1), _chunk(" b", 2), _chunk("", 4, "length")]  # 2 tokens of an unfinished character
    assert list(token_pieces(chunks)) == [b" a", b" b", b"", b""]


def test_token_pieces_refuses_errors_and_cut_streams() -> None:
    with pytest.raises(BackendError, match="exceeds"):
        list(token_pieces([{"error": {"code": 400, "message": "request exceeds the context"}}]))
    with pytest.raises(BackendError, match="without a final chunk"):
        list(token_pieces([_chunk(" a", 1)]))


# --- closing ---------------------------------------------------------------


def test_a_closed_model_refuses_work(llama_spec: ModelSpec) -> None:
    loaded = load_model(llama_spec)
    loaded.close()
    with pytest.raises(BackendError, match="closed"):
        loaded.count_tokens("the gate")


def test_a_model_closed_right_after_its_load_does_not_hang(llama_spec: ModelSpec) -> None:
    """llama.cpp's server stops its task loop by clearing a flag the loop sets as it starts: a server
    closed before that thread ran waited for it for ever (a test-busy run hung here; ~1 in 50 loads and
    closes under a CPU burner). Loads and closes in a process of their own, so a hang fails the test."""
    script = (
        "from pathlib import Path\n"
        "from workers.backends import load_model\n"
        "from workers.contract.registry import ModelSpec, BACKEND_LLAMACPP\n"
        f"spec = ModelSpec(name='tiny-llamacpp', path=Path({str(llama_spec.path)!r}), backend=BACKEND_LLAMACPP,\n"
        f"                 model_type='llama', context_length={llama_spec.context_length})\n"
        "for _ in range(100):\n"
        "    load_model(spec).close()\n"
        "print('closed 100')\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("loading and closing the model 100 times hung (60 s; it takes ~2 s)")
    assert done.returncode == 0 and "closed 100" in done.stdout, done.stderr[-2000:]
