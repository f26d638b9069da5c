"""The llama.cpp backend (xllamacpp) on the real tiny model: no mocks, the real C++ server.

The same tiny GGUF is loaded by ctransformers too, so several tests check that
both backends agree: same tokens, same greedy text.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT
from tests.conftest_models import TINY_CONTEXT, tiny_model_path, tiny_spec  # noqa: F401 - fixtures
from workers.backends import (
    BackendError,
    GenerationParams,
    LoadedModel,
    PromptTooLongError,
    load_model,
)
from workers.backends.ctransformers_backend import CTransformersModel
from workers.backends.llamacpp_backend import LlamaCppModel, token_pieces
from workers.contract.registry import BACKEND_LLAMACPP, ModelSpec
from workers.tinymodel import EOS_ID

PROMPT = "System: be brief\n\nUser: open the gate\n\nAssistant:"
GREEDY = GenerationParams(max_tokens=40, temperature=0)


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


def _is_printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()


# --- loading ---------------------------------------------------------------


def test_loads_as_a_loaded_model(model: LlamaCppModel, llama_spec: ModelSpec) -> None:
    assert isinstance(model, LoadedModel)
    assert model.spec == llama_spec
    assert model.context_length == TINY_CONTEXT


def test_missing_file_is_a_backend_error(tmp_path: Path) -> None:
    spec = ModelSpec(name="gone", path=tmp_path / "nope" / "model.gguf", backend=BACKEND_LLAMACPP)
    with pytest.raises(BackendError, match="does not exist"):
        load_model(spec)


def test_directory_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="not a file"):
        load_model(ModelSpec(name="dir", path=tmp_path, backend=BACKEND_LLAMACPP))


def test_truncated_gguf_is_a_backend_error(tiny_model_path: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model_path.read_bytes()[:400_000])
    with pytest.raises(BackendError, match="truncated"):
        load_model(ModelSpec(name="cut", path=cut, backend=BACKEND_LLAMACPP))


def test_garbage_file_is_a_backend_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(BackendError, match="cannot load"):
        load_model(ModelSpec(name="junk", path=junk, backend=BACKEND_LLAMACPP))


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
from workers.backends import GenerationParams, load_model
from workers.contract.registry import ModelSpec

spec = ModelSpec(name="forked", path=Path(sys.argv[1]), backend="llama.cpp", context_length=int(sys.argv[2]))
texts = []
for _ in range(2):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            text = load_model(spec).generate(sys.argv[3], GenerationParams(max_tokens=40, temperature=0)).text
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
    params = GenerationParams(max_tokens=40, temperature=0, repetition_penalty=1.3)
    penalised = model.generate(PROMPT, params).text
    assert penalised == ctransformers_model.generate(PROMPT, params).text
    assert penalised != greedy_text


def test_greedy_is_deterministic_across_loads(llama_spec: ModelSpec, greedy_text: str) -> None:
    fresh = [load_model(llama_spec).generate(PROMPT, GREEDY).text for _ in range(2)]
    assert fresh == [greedy_text, greedy_text]


def test_greedy_is_deterministic_within_a_load(model: LlamaCppModel, greedy_text: str) -> None:
    model.generate(PROMPT[:20] + " something else entirely", GREEDY)  # a shared prefix, then other text
    assert model.generate(PROMPT, GREEDY).text == greedy_text


def test_greedy_ignores_sampling_knobs(model: LlamaCppModel, greedy_text: str) -> None:
    params = GenerationParams(max_tokens=40, temperature=0, top_k=50, top_p=0.5, seed=9)
    assert model.generate(PROMPT, params).text == greedy_text


def test_output_is_printable_words(model: LlamaCppModel, greedy_text: str) -> None:
    assert _is_printable_ascii(greedy_text)
    for seed in range(5):
        sampled = model.generate(PROMPT, GenerationParams(max_tokens=30, temperature=1.0, seed=seed)).text
        assert _is_printable_ascii(sampled), sampled


def test_seeded_sampling_is_reproducible(model: LlamaCppModel) -> None:
    def sample(seed: int) -> str:
        return model.generate(PROMPT, GenerationParams(max_tokens=30, temperature=0.9, seed=seed)).text

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_registry_repetition_penalty_is_the_default(llama_spec: ModelSpec, model: LlamaCppModel) -> None:
    """``repetition_penalty`` in the registry applies when the request gives none (1.0)."""
    penalised = load_model(replace(llama_spec, repetition_penalty=1.3))
    assert penalised.generate(PROMPT, GREEDY).text == model.generate(
        PROMPT, GenerationParams(max_tokens=40, temperature=0, repetition_penalty=1.3)).text
    explicit = GenerationParams(max_tokens=40, temperature=0, repetition_penalty=1.1)
    assert penalised.generate(PROMPT, explicit).text == model.generate(PROMPT, explicit).text


def test_max_tokens_gives_length(model: LlamaCppModel) -> None:
    result = model.generate(PROMPT, GenerationParams(max_tokens=17, temperature=0))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 17
    assert result.prompt_tokens == model.count_tokens(PROMPT)


def test_stop_sequence_from_the_output_truncates(model: LlamaCppModel, greedy_text: str) -> None:
    stop = greedy_text[len(greedy_text) // 2 : len(greedy_text) // 2 + 5]
    expected = greedy_text[: greedy_text.find(stop)]
    params = GenerationParams(max_tokens=40, temperature=0, stop=("never-seen-@@", stop))
    result = model.generate(PROMPT, params)
    assert result.text == expected
    assert stop not in result.text
    assert result.finish_reason == "stop"
    assert 0 < result.completion_tokens < 40


def test_stop_sequence_split_across_tokens(model: LlamaCppModel) -> None:
    pieces = list(model.stream(PROMPT, GREEDY))  # no stops: one piece per token
    assert len(pieces) == GREEDY.max_tokens
    i = next(i for i in range(5, len(pieces) - 1) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 3)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    full = "".join(pieces)
    run = model.stream(PROMPT, GenerationParams(max_tokens=40, temperature=0, stop=(stop,)))
    streamed = list(run)
    assert "".join(streamed) == full[: full.find(stop)]
    assert all(stop not in p for p in streamed)
    assert run.finish_reason == "stop"
    assert run.completion_tokens <= i + 2


def test_stream_and_generate_agree(model: LlamaCppModel) -> None:
    params = GenerationParams(max_tokens=25, temperature=0.7, seed=5, stop=(" the",))
    run = model.stream(PROMPT, params)
    text = "".join(run)
    result = model.generate(PROMPT, params)
    assert (text, run.prompt_tokens, run.completion_tokens, run.finish_reason) == (
        result.text, result.prompt_tokens, result.completion_tokens, result.finish_reason)


def test_end_of_sequence_ends_with_stop_and_is_not_counted(model: LlamaCppModel,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Force end-of-sequence (the tiny model never picks it) and watch the backend drop it."""
    body = model.request_body
    monkeypatch.setattr(model, "request_body",
                        lambda tokens, params: {**body(tokens, params), "logit_bias": [[EOS_ID, 1e6]]})
    result = model.generate(PROMPT, GREEDY)
    assert (result.text, result.completion_tokens, result.finish_reason) == ("", 0, "stop")


def test_prompt_filling_the_context_exactly_works(model: LlamaCppModel) -> None:
    prompt = "the gate " * 50
    room = TINY_CONTEXT - model.count_tokens(prompt)
    assert room > 0
    result = model.generate(prompt, GenerationParams(max_tokens=room, temperature=0))
    assert (result.completion_tokens, result.finish_reason) == (room, "length")
    assert _is_printable_ascii(result.text)


def test_over_long_prompt_is_refused_before_generating(model: LlamaCppModel) -> None:
    prompt = "the gate " * 200
    with pytest.raises(PromptTooLongError) as info:
        model.stream(prompt, GenerationParams(max_tokens=10))  # raised before iterating
    err = info.value
    assert isinstance(err, BackendError)
    assert err.prompt_tokens == model.count_tokens(prompt)
    assert err.context_length == TINY_CONTEXT


def test_prompt_plus_max_tokens_over_context_is_refused(model: LlamaCppModel) -> None:
    prompt = "the gate " * 50
    room = TINY_CONTEXT - model.count_tokens(prompt)
    with pytest.raises(PromptTooLongError):
        model.generate(prompt, GenerationParams(max_tokens=room + 1))


# --- tokenizer -------------------------------------------------------------


def test_count_tokens_uses_the_model_tokenizer(model: LlamaCppModel) -> None:
    assert model.count_tokens("") == 1  # just BOS
    assert model.count_tokens("the gate") == 3  # BOS, "▁the", "▁gate"
    text = "open the gate, audit the token queue"
    assert model.generate(text, GenerationParams(max_tokens=1)).prompt_tokens == model.count_tokens(text)


@pytest.mark.parametrize("text", ["the gate", PROMPT, "é€🎉" * 10, "tabs\tand\nlines", "  spaced  out  "])
def test_tokens_match_ctransformers(model: LlamaCppModel, ctransformers_model: CTransformersModel, text: str) -> None:
    assert model.tokenize(text) == ctransformers_model.tokenize(text)


def test_a_nul_in_the_prompt_is_served(model: LlamaCppModel, llama_spec: ModelSpec) -> None:
    """llama.cpp takes any character, so the gateway lets a NUL through for its models (ctransformers cannot)."""
    from workers.contract.tokenizers import load_tokenizer

    text = "open\x00the gate"
    run = model.generate(text, GenerationParams(max_tokens=3, temperature=0))
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


# --- sharing one model -----------------------------------------------------


@pytest.mark.timeout(60)
def test_closed_stream_frees_the_model(model: LlamaCppModel, greedy_text: str) -> None:
    run = model.stream(PROMPT, GREEDY)
    next(run)
    run.close()
    assert run.finish_reason is None
    assert model.generate(PROMPT, GREEDY).text == greedy_text


@pytest.mark.timeout(60)
def test_model_is_free_once_the_text_is_out(model: LlamaCppModel, greedy_text: str) -> None:
    run = model.stream(PROMPT, GREEDY)
    text = ""
    while text != greedy_text:  # never asks for StopIteration
        text += next(run)
    assert run.finish_reason == "length"
    assert model.generate(PROMPT, GREEDY).text == greedy_text


@pytest.mark.timeout(60)
def test_second_stream_on_the_same_thread_fails_instead_of_deadlocking(model: LlamaCppModel) -> None:
    first = model.stream(PROMPT, GREEDY)
    next(first)
    with pytest.raises(BackendError, match="already generating"):
        model.generate(PROMPT, GREEDY)
    first.close()
    assert model.generate(PROMPT, GenerationParams(max_tokens=3)).completion_tokens == 3


@pytest.mark.timeout(60)
def test_threads_take_turns(model: LlamaCppModel, greedy_text: str) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(model.generate(PROMPT, GREEDY).text)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [greedy_text] * 4


def test_a_closed_model_refuses_work(llama_spec: ModelSpec) -> None:
    loaded = load_model(llama_spec)
    loaded.close()
    with pytest.raises(BackendError, match="closed"):
        loaded.count_tokens("the gate")
