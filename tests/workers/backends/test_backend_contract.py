"""What every backend promises, on the real tiny model: each test here runs once per backend.

The worker treats all backends alike (load, generate, stream, count tokens,
refuse what does not fit, take turns on one model), so every backend must
behave alike in these. Tests of one backend's own machinery live beside this
file, in ``test_<backend>.py``.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest_models import TINY_CONTEXT, tiny_model_path, tiny_spec  # noqa: F401 - fixtures
from tests.workers.backends.prompt import GREEDY, PROMPT, is_printable_ascii
from workers.backends import BackendError, SamplingParams, LoadedModel, PromptTooLongError, load_model
from workers.contract.registry import BACKEND_CTRANSFORMERS, BACKEND_LLAMACPP, ModelSpec

#: The backends the contract runs against, by registry name.
#: A new backend gets every test in this file by adding its name here.
BACKENDS = [BACKEND_CTRANSFORMERS, BACKEND_LLAMACPP]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def spec(tiny_spec: ModelSpec, backend: str) -> ModelSpec:
    return replace(tiny_spec, name=f"tiny-{backend}", backend=backend)


@pytest.fixture(scope="module")
def model(spec: ModelSpec) -> LoadedModel:
    return load_model(spec)


@pytest.fixture(scope="module")
def greedy_text(model: LoadedModel) -> str:
    return model.generate(PROMPT, GREEDY).text


# --- loading ---------------------------------------------------------------


def test_loads_as_a_loaded_model(model: LoadedModel, spec: ModelSpec) -> None:
    assert isinstance(model, LoadedModel)
    assert model.spec == spec
    assert model.context_length == TINY_CONTEXT


def test_missing_file_is_a_backend_error(backend: str, tmp_path: Path) -> None:
    spec = ModelSpec(name="gone", path=tmp_path / "nope" / "model.gguf", backend=backend)
    with pytest.raises(BackendError, match="does not exist"):
        load_model(spec)


def test_directory_is_a_backend_error(backend: str, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="not a file"):
        load_model(ModelSpec(name="dir", path=tmp_path, backend=backend))


def test_truncated_gguf_is_a_backend_error(backend: str, tiny_model_path: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model_path.read_bytes()[:400_000])
    with pytest.raises(BackendError, match="truncated"):
        load_model(ModelSpec(name="cut", path=cut, backend=backend))


def test_garbage_file_is_a_backend_error(backend: str, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(BackendError, match="cannot load"):
        load_model(ModelSpec(name="junk", path=junk, backend=backend))


# --- generation ------------------------------------------------------------


def test_greedy_is_deterministic_across_loads(spec: ModelSpec, greedy_text: str) -> None:
    fresh = [load_model(spec).generate(PROMPT, GREEDY).text for _ in range(2)]
    assert fresh == [greedy_text, greedy_text]
    assert len(greedy_text.split()) >= 10


def test_greedy_is_deterministic_within_a_load(model: LoadedModel, greedy_text: str) -> None:
    # Leave something else cached first: another prompt, then one sharing a prefix with PROMPT.
    for other in ("something else entirely", PROMPT[:20] + " something else entirely"):
        model.generate(other, GREEDY)
        assert model.generate(PROMPT, GREEDY).text == greedy_text


def test_greedy_ignores_sampling_knobs(model: LoadedModel, greedy_text: str) -> None:
    params = SamplingParams(max_tokens=40, temperature=0, top_k=50, top_p=0.5, seed=9)
    assert model.generate(PROMPT, params).text == greedy_text


def test_output_is_printable_words(model: LoadedModel, greedy_text: str) -> None:
    assert is_printable_ascii(greedy_text)
    for seed in range(5):
        sampled = model.generate(PROMPT, SamplingParams(max_tokens=30, temperature=1.0, seed=seed)).text
        assert is_printable_ascii(sampled), sampled


def test_seeded_sampling_is_reproducible(model: LoadedModel) -> None:
    def sample(seed: int) -> str:
        return model.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0.9, seed=seed)).text

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_unseeded_sampling_differs_within_one_second(model: LoadedModel) -> None:
    # A negative seed means a fresh random seed per generation (SamplingParams); ctransformers' own -1 is
    # time(NULL), so requests within one second all sampled the same text.
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=-1)
    assert len({model.generate(PROMPT, params).text for _ in range(4)}) > 1


def test_max_tokens_gives_length(model: LoadedModel) -> None:
    result = model.generate(PROMPT, SamplingParams(max_tokens=17, temperature=0))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 17
    assert result.prompt_tokens == model.count_tokens(PROMPT)


def test_stop_sequence_from_the_output_truncates(model: LoadedModel, greedy_text: str) -> None:
    stop = greedy_text[len(greedy_text) // 2 : len(greedy_text) // 2 + 5]
    expected = greedy_text[: greedy_text.find(stop)]
    params = SamplingParams(max_tokens=40, temperature=0, stop=("never-seen-@@", stop))
    result = model.generate(PROMPT, params)
    assert result.text == expected
    assert stop not in result.text
    assert result.finish_reason == "stop"
    assert 0 < result.completion_tokens < 40


def test_stop_sequence_split_across_tokens(model: LoadedModel) -> None:
    pieces = list(model.stream(PROMPT, GREEDY))  # no stops: one piece per token
    assert len(pieces) == GREEDY.max_tokens
    i = next(i for i in range(5, len(pieces) - 1) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 3)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    full = "".join(pieces)
    at = full.find(stop)
    expected = full[:at]
    # The token that completes the first occurrence is the last one generated.
    ends = [len("".join(pieces[: k + 1])) for k in range(len(pieces))]
    completing = next(k for k, end in enumerate(ends) if end >= at + len(stop)) + 1
    run = model.stream(PROMPT, SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))
    streamed = list(run)
    assert "".join(streamed) == expected
    assert all(stop not in p for p in streamed)
    assert run.finish_reason == "stop"
    assert run.completion_tokens == completing <= i + 2


def test_stream_and_generate_agree(model: LoadedModel) -> None:
    params = SamplingParams(max_tokens=25, temperature=0.7, seed=5, stop=(" the",))
    run = model.stream(PROMPT, params)
    text = "".join(run)
    result = model.generate(PROMPT, params)
    assert (text, run.prompt_tokens, run.completion_tokens, run.finish_reason) == (
        result.text,
        result.prompt_tokens,
        result.completion_tokens,
        result.finish_reason,
    )


def test_prompt_filling_the_context_exactly_works(model: LoadedModel) -> None:
    prompt = "the gate " * 50
    room = TINY_CONTEXT - model.count_tokens(prompt)
    assert room > 0
    result = model.generate(prompt, SamplingParams(max_tokens=room, temperature=0))
    assert (result.completion_tokens, result.finish_reason) == (room, "length")
    assert is_printable_ascii(result.text)


def test_over_long_prompt_is_refused_before_generating(model: LoadedModel) -> None:
    prompt = "the gate " * 200
    with pytest.raises(PromptTooLongError) as info:
        model.stream(prompt, SamplingParams(max_tokens=10))  # raised before iterating
    err = info.value
    assert isinstance(err, BackendError)
    assert err.prompt_tokens == model.count_tokens(prompt)
    assert err.context_length == TINY_CONTEXT
    assert f"{TINY_CONTEXT} tokens" in str(err)


def test_prompt_plus_max_tokens_over_context_is_refused(model: LoadedModel) -> None:
    prompt = "the gate " * 50
    room = TINY_CONTEXT - model.count_tokens(prompt)
    with pytest.raises(PromptTooLongError):
        model.generate(prompt, SamplingParams(max_tokens=room + 1))


# --- tokenizer -------------------------------------------------------------


def test_count_tokens_matches_the_tokenizer(model: LoadedModel) -> None:
    assert model.count_tokens("") == 1  # just BOS
    assert model.tokenize("the gate")[0] == 1
    assert model.count_tokens("the gate") == 3  # BOS, "▁the", "▁gate"
    text = "open the gate, audit the token queue"
    assert model.count_tokens(text) == len(model.tokenize(text))
    assert model.generate(text, SamplingParams(max_tokens=1)).prompt_tokens == model.count_tokens(text)


# --- sharing one model -----------------------------------------------------


@pytest.mark.timeout(60)
def test_closed_stream_frees_the_model(model: LoadedModel, greedy_text: str) -> None:
    run = model.stream(PROMPT, GREEDY)
    next(run)
    run.close()
    assert run.finish_reason is None
    assert model.generate(PROMPT, GREEDY).text == greedy_text


def test_held_back_stop_prefix_is_released(model: LoadedModel, greedy_text: str) -> None:
    pieces = list(model.stream(PROMPT, GREEDY))
    # The text repeatedly ends with a start of this stop (at least at piece 3),
    # but it can never complete: control bytes are never generated.
    stop = pieces[3] + "\x01"
    run = model.stream(PROMPT, SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))
    streamed = list(run)
    assert "".join(streamed) == greedy_text
    assert len(streamed) < len(pieces), "the matching tail should have been held back"
    assert run.finish_reason == "length"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_stop", [True, False])
def test_model_is_free_once_the_text_is_out(model: LoadedModel, greedy_text: str, use_stop: bool) -> None:
    """A consumer that stops reading once it has all the text must not keep the model."""
    stops: tuple[str, ...] = ()
    expected = greedy_text
    if use_stop:
        pieces = list(model.stream(PROMPT, GREEDY))
        offsets = [len("".join(pieces[:k])) for k in range(len(pieces))]
        # A stop starting inside a token, after its first character, first seen there.
        k = next(k for k in range(3, len(pieces)) if greedy_text.find(pieces[k][1:3]) == offsets[k] + 1)
        stops = (pieces[k][1:3],)
        expected = greedy_text[: offsets[k] + 1]
    run = model.stream(PROMPT, SamplingParams(max_tokens=40, temperature=0, stop=stops))
    text = ""
    while text != expected:  # never asks for StopIteration
        text += next(run)
    assert run.finish_reason == ("stop" if use_stop else "length")
    # Same thread: if the run still held the model this would raise "already generating".
    assert model.generate(PROMPT, GREEDY).text == greedy_text


@pytest.mark.timeout(60)
def test_second_stream_on_the_same_thread_fails_instead_of_deadlocking(model: LoadedModel) -> None:
    first = model.stream(PROMPT, GREEDY)
    next(first)
    with pytest.raises(BackendError, match="already generating"):
        model.generate(PROMPT, GREEDY)
    first.close()
    assert model.generate(PROMPT, SamplingParams(max_tokens=3)).completion_tokens == 3


@pytest.mark.timeout(60)
def test_threads_take_turns(model: LoadedModel, greedy_text: str) -> None:
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
