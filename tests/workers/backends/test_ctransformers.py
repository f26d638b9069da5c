"""The ctransformers backend's own machinery on the real tiny model: no mocks, real C library.

What every backend promises is in ``test_backend_contract.py``; here are the
CPU-specific library, the byte-token detokenizer and the NUL refusal.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from tests.conftest_models import tiny_model_path, tiny_spec  # noqa: F401 - fixtures
from tests.workers.backends.prompt import GREEDY, PROMPT
from workers.backends import (
    BackendError,
    SamplingParams,
    GenerationRun,
    check_model_file,
    load_model,
)
from workers.backends.ctransformers_backend import CTransformersModel, choose_lib
from workers.contract.registry import ModelSpec

BYTE_BASE = 3  # the tiny vocabulary's <0x00> id: after <unk>, <s>, </s>


@pytest.fixture(scope="module")
def model(tiny_spec: ModelSpec) -> CTransformersModel:
    loaded = load_model(tiny_spec)
    assert isinstance(loaded, CTransformersModel)
    return loaded


@pytest.fixture(scope="module")
def greedy_text(model: CTransformersModel) -> str:
    return model.generate(PROMPT, GREEDY).text


# --- loading ---------------------------------------------------------------


def test_check_model_file_accepts_the_tiny_model(tiny_model_path: Path) -> None:
    check_model_file(tiny_model_path)  # raises if not
    assert tiny_model_path.stat().st_size > 0


def _gguf_v1(tensor_bytes: int) -> bytes:
    """A GGUF v1 file (32-bit counts, lengths and dimensions): one string key, one F32 tensor of 8 values."""
    def text(value: bytes) -> bytes:
        return struct.pack("<I", len(value)) + value
    head = b"GGUF" + struct.pack("<III", 1, 1, 1)  # version 1, one tensor, one key
    head += text(b"general.architecture") + struct.pack("<I", 8) + text(b"llama")
    head += text(b"t") + struct.pack("<III", 1, 8, 0) + struct.pack("<Q", 0)  # 1 dim of 8, F32, at offset 0
    head += b"\0" * (-len(head) % 32)
    return head + b"\0" * tensor_bytes


@pytest.mark.parametrize("version", [0, 4, 0x9A3B7F21])
def test_random_bytes_behind_a_gguf_magic_are_refused_before_the_loader(tmp_path: Path, version: int) -> None:
    # ctransformers reads any GGUF version as v2: given random bytes it allocated terabytes and the worker
    # died of SIGSEGV instead of exiting with a reason naming the file.
    path = tmp_path / "noise.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", version) + random.Random(version).randbytes(4096))
    with pytest.raises(BackendError, match=f"noise.gguf is not a GGUF file govgate can read .*version {version}"):
        check_model_file(path)


def test_a_gguf_v1_file_is_checked_with_its_32_bit_layout(tmp_path: Path) -> None:
    path = tmp_path / "v1.gguf"
    path.write_bytes(_gguf_v1(32))
    check_model_file(path)  # whole: accepted
    path.write_bytes(_gguf_v1(31))
    with pytest.raises(BackendError, match="needs .* bytes but the file has"):
        check_model_file(path)
    path.write_bytes(b"GGUF" + struct.pack("<I", 1) + random.Random(1).randbytes(4096))
    with pytest.raises(BackendError, match="not a valid GGUF file"):
        check_model_file(path)


def test_unknown_backend_is_a_backend_error(tiny_model_path: Path) -> None:
    with pytest.raises(BackendError, match="unknown backend"):
        load_model(ModelSpec(name="x", path=tiny_model_path, backend="nope"))


def test_generated_model_is_written_on_first_load(tmp_path: Path) -> None:
    spec = ModelSpec(name="gen", path=tmp_path / "models" / "tiny.gguf", context_length=128, generate="tiny-llama")
    loaded = load_model(spec)
    assert spec.path.is_file()
    assert loaded.context_length == 128


def test_lib_choice_follows_cpu_flags(model: CTransformersModel) -> None:
    assert Path(choose_lib({"avx2", "avx", "f16c"})).parent.name == "avx2"
    assert Path(choose_lib({"avx", "f16c"})).parent.name == "avx"
    assert Path(choose_lib({"avx"})).parent.name == "basic"
    assert Path(choose_lib(set())).parent.name == "basic"
    assert Path(model.lib).is_file()  # the library chosen for this CPU is the one loaded


# --- generation ------------------------------------------------------------


# --- tokenizer -------------------------------------------------------------


def test_multibyte_text_does_not_overflow_the_token_buffer(model: CTransformersModel) -> None:
    # BOS + "▁" + one byte token per UTF-8 byte: far more tokens than characters.
    text = "é€🎉" * 10
    assert model.count_tokens(text) == 2 + len(text.encode())
    ids = model.tokenize(text)[1:]
    assert b"".join(model._token_bytes(t) for t in ids).decode() == " " + text


def test_nul_is_refused(model: CTransformersModel) -> None:
    with pytest.raises(BackendError, match="NUL"):
        model.count_tokens("a\x00b")


# --- the shared loop, fed real ids and the real detokenizer ----------------


def test_characters_split_over_byte_tokens_are_never_broken(model: CTransformersModel) -> None:
    ids = [BYTE_BASE + b for b in "é🎉".encode()]
    run = GenerationRun(iter(ids), model._token_bytes, prompt_tokens=1, params=SamplingParams(max_tokens=10))
    pieces = list(run)
    assert pieces == ["é", "🎉"]
    assert (run.completion_tokens, run.finish_reason) == (len(ids), "stop")


def test_end_of_sequence_gives_stop(model: CTransformersModel) -> None:
    ids = model.tokenize("the gate")[1:]
    run = GenerationRun(iter(ids), model._token_bytes, prompt_tokens=4, params=SamplingParams(max_tokens=10))
    result = run.collect()
    assert (result.text, result.completion_tokens, result.finish_reason) == (" the gate", 2, "stop")


def test_params_are_validated() -> None:
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=1, temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=1, top_p=0)
    assert SamplingParams(max_tokens=1, stop="x").stop == ("x",)  # type: ignore[arg-type]
