"""The generated tiny llama: deterministic, small, and plain llama metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, TokenType

from tests.conftest_models import TINY_CONTEXT, tiny_model_path  # noqa: F401 - fixture
from workers.tinymodel import BOS_ID, EOS_ID, UNK_ID, write_tiny_llama_gguf


def _field(reader: GGUFReader, key: str):  # noqa: ANN202 - scalar or list
    field = reader.get_field(key)
    assert field is not None, f"missing metadata {key}"
    return field.contents()


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = write_tiny_llama_gguf(tmp_path / "a.gguf", seed=7)
    b = write_tiny_llama_gguf(tmp_path / "b.gguf", seed=7)
    assert a.read_bytes() == b.read_bytes()


def test_different_seeds_give_different_weights(tmp_path: Path) -> None:
    a = write_tiny_llama_gguf(tmp_path / "a.gguf", seed=1)
    b = write_tiny_llama_gguf(tmp_path / "b.gguf", seed=2)
    assert a.stat().st_size == b.stat().st_size
    assert a.read_bytes() != b.read_bytes()


def test_write_is_atomic_and_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.gguf"
    target.parent.mkdir()
    target.write_bytes(b"old partial junk")
    assert write_tiny_llama_gguf(target) == target
    assert target.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in target.parent.iterdir()] == ["m.gguf"], "temp file left behind"


def test_file_is_small(tiny_model_path: Path) -> None:
    assert tiny_model_path.stat().st_size < 2 * 1024 * 1024


def test_llama_metadata(tiny_model_path: Path) -> None:
    r = GGUFReader(tiny_model_path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.context_length") == TINY_CONTEXT
    n_embd = _field(r, "llama.embedding_length")
    n_head = _field(r, "llama.attention.head_count")
    assert _field(r, "llama.attention.head_count_kv") == n_head
    assert _field(r, "llama.rope.dimension_count") == n_embd // n_head
    assert _field(r, "llama.block_count") >= 1
    assert _field(r, "llama.feed_forward_length") > 0
    assert 0 < _field(r, "llama.attention.layer_norm_rms_epsilon") < 1e-3
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.bos_token_id") == BOS_ID
    assert _field(r, "tokenizer.ggml.eos_token_id") == EOS_ID
    assert _field(r, "tokenizer.ggml.unknown_token_id") == UNK_ID


def test_vocabulary_has_specials_bytes_and_words(tiny_model_path: Path) -> None:
    r = GGUFReader(tiny_model_path)
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    scores = _field(r, "tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores)
    assert (tokens[UNK_ID], tokens[BOS_ID], tokens[EOS_ID]) == ("<unk>", "<s>", "</s>")
    assert types[UNK_ID] == TokenType.UNKNOWN
    assert types[BOS_ID] == types[EOS_ID] == TokenType.CONTROL
    index = {t: i for i, t in enumerate(tokens)}
    for b in range(256):
        i = index[f"<0x{b:02X}>"]
        assert types[i] == TokenType.BYTE
    words = [t for t, k in zip(tokens, types) if k == TokenType.NORMAL and t.startswith("\u2581") and len(t) > 3]
    assert len(words) >= 200
    assert {"\u2581the", "\u2581gate"} <= set(words)
    assert len(tokens) == len(set(tokens)), "duplicate tokens"


def test_tensors_cover_a_llama(tiny_model_path: Path) -> None:
    r = GGUFReader(tiny_model_path)
    tensors = {t.name: t for t in r.tensors}
    n_vocab = len(_field(r, "tokenizer.ggml.tokens"))
    n_embd = _field(r, "llama.embedding_length")
    for name in ("token_embd.weight", "output.weight", "output_norm.weight"):
        assert name in tensors
    # GGUF lists dimensions innermost first: {n_embd, n_vocab}.
    assert list(tensors["output.weight"].shape) == [n_embd, n_vocab]
    for i in range(_field(r, "llama.block_count")):
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
            assert f"blk.{i}.{part}.weight" in tensors
    for t in r.tensors:
        assert np.isfinite(np.asarray(t.data)).all(), t.name


def test_context_length_is_configurable(tmp_path: Path) -> None:
    r = GGUFReader(write_tiny_llama_gguf(tmp_path / "m.gguf", context_length=512))
    assert _field(r, "llama.context_length") == 512


def test_rejects_a_useless_context(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_tiny_llama_gguf(tmp_path / "m.gguf", context_length=2)
    assert not list(tmp_path.iterdir())
