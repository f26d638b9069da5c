"""Every family of the founding essay loads and generates through ctransformers.

Real files written by :mod:`workers.tinyggml`, the real C library, no mocks:
if a layout were wrong, ctransformers would refuse it (or worse), so loading
and generating here is the proof that govgate serves the architecture.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.family_models import (  # noqa: F401 - fixtures
    FAMILY_CONTEXT,
    MODEL_NAMES,
    family_paths,
    family_registry,
    family_spec,
    write_family_registry,
)
from workers.backends import BackendError, LoadedModel, PromptTooLongError, SamplingParams, load_model
from workers.backends.ctransformers_backend import CTransformersModel
from workers.contract.registry import load_registry
from workers.tinyggml import DOLLY_SPECIALS, FAMILIES, GGML_MAGIC, family_file_name

PROMPT = "System: be brief\n\nUser: open the gate\n\nAssistant:"
GREEDY = SamplingParams(max_tokens=30, temperature=0)
ALL = sorted(FAMILIES)
GGML = sorted(f for f, entry in FAMILIES.items() if entry.file_format != "GGUF")


@pytest.fixture(scope="module", params=ALL)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family: str, family_paths: dict[str, Path]) -> CTransformersModel:
    loaded = load_model(family_spec(family, family_paths[family]))
    assert isinstance(loaded, CTransformersModel)
    return loaded


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable()


# --- the table ---------------------------------------------------------------


def test_the_essay_families_are_all_covered() -> None:
    assert set(FAMILIES) == {"llama", "alpaca", "cerebras-gpt", "dolly-v2", "stablelm"}
    assert {f: e.model_type for f, e in FAMILIES.items()} == {
        "llama": "llama",
        "alpaca": "llama",
        "cerebras-gpt": "gpt2",
        "dolly-v2": "dolly-v2",
        "stablelm": "gpt_neox",
    }
    for entry in FAMILIES.values():
        writer, model_type, file_format, note = entry  # a plain 4-tuple too
        assert callable(writer) and model_type and file_format and note


# --- the files ---------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_same_seed_gives_identical_bytes(name: str, tmp_path: Path) -> None:
    writer = FAMILIES[name].writer
    a = writer(tmp_path / "a" / family_file_name(name), seed=3)
    b = writer(tmp_path / "b" / family_file_name(name), seed=3)
    c = writer(tmp_path / "c" / family_file_name(name), seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size == c.stat().st_size
    assert a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("name", ALL)
def test_write_is_atomic_and_overwrites(name: str, tmp_path: Path) -> None:
    target = tmp_path / family_file_name(name)
    target.write_bytes(b"old partial junk")
    assert FAMILIES[name].writer(target) == target
    assert target.read_bytes()[:4] != b"old "
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "temp file left behind"


@pytest.mark.parametrize("name", ALL)
def test_file_is_small(name: str, family_paths: dict[str, Path]) -> None:
    assert family_paths[name].stat().st_size < 2 * 1024 * 1024


@pytest.mark.parametrize("name", GGML)
def test_ggml_files_are_legacy_ggml(name: str, family_paths: dict[str, Path]) -> None:
    head = family_paths[name].read_bytes()[:8]
    assert int.from_bytes(head[:4], "little") == GGML_MAGIC
    assert int.from_bytes(head[4:8], "little", signed=True) > 0  # n_vocab, not a version


def test_context_length_is_written_into_the_file(tmp_path: Path) -> None:
    for name in GGML:
        path = FAMILIES[name].writer(tmp_path / family_file_name(name), context_length=64)
        loaded = load_model(family_spec(name, path))
        assert loaded.context_length == 64, name


def test_too_small_a_context_is_refused(tmp_path: Path) -> None:
    for name in GGML:
        with pytest.raises(ValueError):
            FAMILIES[name].writer(tmp_path / family_file_name(name), context_length=4)


# --- loading and generating ---------------------------------------------------


def test_loads_as_a_loaded_model(model: CTransformersModel, family: str) -> None:
    assert isinstance(model, LoadedModel)
    assert model.spec.family == family
    assert model.context_length == FAMILY_CONTEXT


def test_greedy_is_deterministic_across_loads(model: CTransformersModel) -> None:
    texts = [load_model(model.spec).generate(PROMPT, GREEDY).text for _ in range(2)]
    assert texts[0] == texts[1]
    assert model.generate(PROMPT, GREEDY).text == texts[0]
    assert _printable(texts[0]), texts[0]
    assert len(texts[0].split()) >= 10, texts[0]


def test_greedy_is_deterministic_within_a_load(model: CTransformersModel) -> None:
    first = model.generate(PROMPT, GREEDY).text
    model.generate("something else entirely", GREEDY)
    assert model.generate(PROMPT, GREEDY).text == first


def test_sampled_text_is_printable_and_reproducible(model: CTransformersModel) -> None:
    def sample(seed: int) -> str:
        return model.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0.9, seed=seed)).text

    assert sample(5) == sample(5)
    assert all(_printable(sample(seed)) for seed in range(3))


def test_max_tokens_gives_length(model: CTransformersModel) -> None:
    result = model.generate(PROMPT, SamplingParams(max_tokens=17, temperature=0))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 17
    assert result.prompt_tokens == model.count_tokens(PROMPT)


def test_stream_and_generate_agree(model: CTransformersModel) -> None:
    run = model.stream(PROMPT, GREEDY)
    text = "".join(run)
    assert (text, run.completion_tokens, run.finish_reason) == (model.generate(PROMPT, GREEDY).text, 30, "length")


def test_count_tokens(model: CTransformersModel) -> None:
    assert model.count_tokens("open the gate") > 0
    assert model.count_tokens(PROMPT) > model.count_tokens("open the gate")


def test_ascii_round_trips_through_the_tokenizer(model: CTransformersModel) -> None:
    text = "Open the gate, audit #42 {ok}!\n\tdone ~"
    decoded = b"".join(model._token_bytes(t) for t in model.tokenize(text)).decode()
    assert decoded.endswith(text)  # llama also holds BOS and its leading-space piece


def test_prompt_filling_the_context_exactly_works(model: CTransformersModel) -> None:
    prompt = "the gate " * 40
    room = FAMILY_CONTEXT - model.count_tokens(prompt)
    assert room > 0
    result = model.generate(prompt, SamplingParams(max_tokens=room, temperature=0))
    assert (result.completion_tokens, result.finish_reason) == (room, "length")


def test_too_long_prompt_is_refused(model: CTransformersModel) -> None:
    prompt = "the gate " * 200
    with pytest.raises(PromptTooLongError) as info:
        model.generate(prompt, SamplingParams(max_tokens=10))
    assert info.value.prompt_tokens == model.count_tokens(prompt)
    assert info.value.context_length == FAMILY_CONTEXT


def test_empty_prompt_is_deterministic(model: CTransformersModel) -> None:
    """GGML-era tokenizers add no BOS: an empty prompt must not sample stale logits."""
    assert model.count_tokens("") == 1
    params = SamplingParams(max_tokens=8, temperature=0)
    first = model.generate("", params)
    model.generate("something else entirely", params)
    again = model.generate("", params)
    assert (again.text, again.prompt_tokens, again.finish_reason) == (first.text, 1, "length")


# --- family details ----------------------------------------------------------


def test_dolly_markers_are_single_tokens(family_paths: dict[str, Path]) -> None:
    dolly = load_model(family_spec("dolly-v2", family_paths["dolly-v2"]))
    assert isinstance(dolly, CTransformersModel)
    for marker in DOLLY_SPECIALS:
        assert dolly.count_tokens(marker) == 1, marker
    end = dolly.tokenize("### End")[0]
    assert dolly._llm.is_eos_token(end)  # Dolly v2 ends its response with "### End"


def test_alpaca_is_a_llama(family_paths: dict[str, Path]) -> None:
    assert family_paths["alpaca"].read_bytes() == family_paths["llama"].read_bytes()


# --- misconfiguration fails cleanly -------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "wrong_type"),
    [("cerebras-gpt", "gpt_neox"), ("cerebras-gpt", "dolly-v2"), ("stablelm", "gpt2"), ("dolly-v2", "gpt2")],
)
def test_wrong_model_type_is_a_backend_error(
    name: str, wrong_type: str, family_paths: dict[str, Path]
) -> None:
    """Unchecked, ctransformers hangs or allocates until the worker is killed."""
    spec = family_spec(name, family_paths[name])
    with pytest.raises(BackendError, match="check model_type"):
        load_model(replace(spec, model_type=wrong_type))


def test_gpt_neox_layouts_are_interchangeable(family_paths: dict[str, Path]) -> None:
    spec = family_spec("stablelm", family_paths["dolly-v2"])
    assert load_model(spec).generate(PROMPT, SamplingParams(max_tokens=3)).completion_tokens == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", GGML)
def test_truncated_ggml_file_is_a_backend_error(name: str, family_paths: dict[str, Path], tmp_path: Path) -> None:
    data = family_paths[name].read_bytes()
    cut = tmp_path / family_file_name(name)
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(BackendError, match="truncated"):
        load_model(family_spec(name, cut))


# --- through the registry -------------------------------------------------------


def test_family_registry_serves_every_family(family_registry: Path) -> None:
    registry = load_registry(family_registry, family_registry.parent)
    assert registry.names() == sorted(MODEL_NAMES.values())
    for family, name in MODEL_NAMES.items():
        spec = registry.get(name)
        assert spec is not None
        assert (spec.family, spec.model_type, spec.context_length) == (
            family,
            FAMILIES[family].model_type,
            FAMILY_CONTEXT,
        )
        assert spec.path.is_file()
        result = load_model(spec).generate(PROMPT, SamplingParams(max_tokens=5, temperature=0))
        assert (result.completion_tokens, result.finish_reason) == (5, "length")


def test_write_family_registry_is_repeatable(tmp_path: Path) -> None:
    first = write_family_registry(tmp_path)
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert write_family_registry(tmp_path) == first
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == snapshot
