"""Control, unknown and marker tokens a model generates never reach the client, on either backend.

The tiny model here has extra tokens that greedy decoding emits: a control
token, an unknown token, and a user-defined marker spelled like Gemma 3's
``<start_of_image>`` (which a real Gemma reply once contained). llama.cpp
printed the marker and ctransformers printed the unknown token as "▅".
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from gguf import TokenType

from tests.conftest_models import TINY_CONTEXT
from workers.backends import SamplingParams, load_model
from workers.contract.registry import BACKEND_CTRANSFORMERS, BACKEND_LLAMACPP, ModelSpec
from workers.special_tokens import hidden_tokens, is_marker
from workers.tinymodel import write_tiny_llama_gguf
from workers.contract.modelfile import read_gguf_metadata

PROMPT = "System: be brief\n\nUser: open the gate\n\nAssistant:"
MARKERS = (("<start_of_image>", TokenType.USER_DEFINED), ("<|ctl|>", TokenType.CONTROL),
           ("<b>", TokenType.USER_DEFINED), ("<unk2>", TokenType.UNKNOWN))
NEVER_SHOWN = ("<start_of_image>", "<|ctl|>", "<unk2>", "\u2585")
GREEDY = SamplingParams(max_tokens=40, temperature=0)


@pytest.fixture(scope="module")
def marker_spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("markers") / "markers.gguf", context_length=TINY_CONTEXT,
                                 markers=MARKERS)
    return ModelSpec(name="tiny-markers", path=path, backend=BACKEND_CTRANSFORMERS, context_length=TINY_CONTEXT)


@pytest.fixture(scope="module")
def models(marker_spec: ModelSpec) -> dict:
    return {backend: load_model(replace(marker_spec, backend=backend))
            for backend in (BACKEND_CTRANSFORMERS, BACKEND_LLAMACPP)}


def marker_ids(path: Path) -> dict[str, int]:
    tokens = read_gguf_metadata(path, {"tokenizer.ggml.tokens"})["tokenizer.ggml.tokens"]
    return {text: tokens.index(text.encode()) for text, _ in MARKERS}


def test_greedy_decoding_does_emit_the_special_tokens(models, marker_spec):
    """Guard: the test model really generates them (read as ids from ctransformers' own sampler)."""
    model = models[BACKEND_CTRANSFORMERS]
    ids = marker_ids(marker_spec.path)
    sampled = model._llm.generate(model.tokenize(PROMPT), top_k=1, top_p=1.0, temperature=1.0,
                                  repetition_penalty=1.0, last_n_tokens=64, seed=1, threads=1, reset=True)
    generated = [token for _, token in zip(range(GREEDY.max_tokens), sampled)]
    assert {ids["<start_of_image>"], ids["<|ctl|>"], ids["<unk2>"]} <= set(generated)


@pytest.mark.parametrize("backend", [BACKEND_CTRANSFORMERS, BACKEND_LLAMACPP])
def test_special_tokens_never_reach_the_text(models, backend):
    model = models[backend]
    generation = model.generate(PROMPT, GREEDY)
    assert generation.completion_tokens == GREEDY.max_tokens  # hidden tokens are still counted
    assert generation.text.strip()
    for shown in NEVER_SHOWN:
        assert shown not in generation.text
    run = model.stream(PROMPT, GREEDY)
    pieces = list(run)
    assert "".join(pieces) == generation.text
    assert all(piece for piece in pieces)  # a hidden token sends no empty piece either
    assert not any(shown in piece for piece in pieces for shown in NEVER_SHOWN)


def test_both_backends_show_the_same_text(models):
    texts = {backend: model.generate(PROMPT, GREEDY).text for backend, model in models.items()}
    assert texts[BACKEND_CTRANSFORMERS] == texts[BACKEND_LLAMACPP]


def test_which_tokens_are_hidden(marker_spec):
    ids = marker_ids(marker_spec.path)
    hidden = hidden_tokens(marker_spec.path)
    assert {ids["<start_of_image>"], ids["<|ctl|>"], ids["<unk2>"], 0, 1, 2} <= hidden.ids  # 0-2: <unk> <s> </s>
    assert ids["<b>"] not in hidden.ids  # user-defined text (Gemma has <b>, <table>, newline runs) is kept
    assert hidden.texts == (b"<start_of_image>",)
    assert hidden.strip(b"<start_of_image>") == b"" and hidden.strip(b" gate") == b" gate"


@pytest.mark.parametrize("text,marker", [
    ("<start_of_image>", True), ("<end_of_image>", True), ("[multimodal]", True), ("<|image_pad|>", True),
    ("<end_of_turn>", True), ("</s>", True),
    ("<table>", False), ("<h1>", False), ("</td>", False), ("\n\n\n", False), ("\t\t", False), ("<b>", False),
])
def test_user_defined_markers_are_told_from_text(text, marker):
    assert is_marker(text) is marker


def test_a_file_without_token_types_hides_nothing(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"lmgg" + bytes(64))
    assert hidden_tokens(path).ids == frozenset()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gemma_markers_are_hidden_and_its_text_tokens_kept(tmp_path: Path) -> None:
    from govgate.model_files import ensure_models
    from workers.contract.registry import DEFAULT_MODEL_NAME, Registry, default_registry

    spec = default_registry(tmp_path).get(DEFAULT_MODEL_NAME)
    ensure_models(Registry({spec.name: spec}), lambda line: None)
    tokens = read_gguf_metadata(spec.path, {"tokenizer.ggml.tokens"})["tokenizer.ggml.tokens"]
    hidden = hidden_tokens(spec.path)
    for marker in (b"<start_of_image>", b"<end_of_image>", b"[multimodal]", b"<end_of_turn>", b"<eos>"):
        assert tokens.index(marker) in hidden.ids
    for text in (b"<table>", b"<h1>", b"\n\n", b"\t\t"):
        assert tokens.index(text) not in hidden.ids
    model = load_model(spec)
    reply = model.generate("<start_of_image>", SamplingParams(max_tokens=24, temperature=0))
    assert "<start_of_image>" not in reply.text and "<end_of_image>" not in reply.text
