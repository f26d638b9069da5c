"""Tiny random-weight models of every family govgate's founding essay names.

LLaMA, Alpaca, Cerebras-GPT, Dolly v2 and StableLM: files with the *layout* a
real conversion has (LLaMA and Alpaca as GGUF via :mod:`workers.tinymodel`,
the others as the legacy GGML files ctransformers' bundled loaders read) and
random weights, so each architecture is shown to load and generate on a clean
machine with no download. See docs/architecture.md, section "workers/backends
and model files".
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from workers.atomic_file import atomic_path
from workers.tinymodel import _WORDS, write_tiny_llama_gguf

#: Shape shared by the GGML families; the feed-forward width is 4 * N_EMBD in
#: both architectures (the loaders derive it, the file does not say).
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
#: Rotary dimensions for gpt-neox: a quarter of the head, as Pythia/Dolly and
#: StableLM-alpha use (``rotary_pct = 0.25``).
N_ROT = (N_EMBD // N_HEAD) // 4

GGML_MAGIC = 0x67676D6C
_FTYPE_ALL_F32 = 0
_GGML_TYPE_F32 = 0

ENDOFTEXT = "<|endoftext|>"
#: Dolly v2's instruction markers; its tokenizer has them as single tokens.
DOLLY_SPECIALS = ("### End", "### Instruction:", "### Response:")

_BIAS_BANNED = -200.0
_BIAS_WORD = 6.0
_BIAS_CHAR = -6.0


class Family(NamedTuple):
    """How one model family is written and served.

    A tuple so tests and docs can unpack it; fields say what a registry
    entry for a real model of the family needs.
    """

    writer: Callable[..., Path]
    model_type: str
    file_format: str
    prompt_note: str


def write_tiny_llama_ggml(path: Path, *, seed: int = 0, context_length: int = 256) -> Path:
    """The tiny LLaMA: a GGUF file, the format ctransformers reads llama from today.

    Named ``_ggml`` like its siblings (a file for the ggml library) so every
    family's writer has the same name and signature.
    """
    return write_tiny_llama_gguf(path, seed=seed, context_length=context_length)


def write_tiny_alpaca_ggml(path: Path, *, seed: int = 0, context_length: int = 256) -> Path:
    """The tiny Alpaca: architecturally a LLaMA, so the same GGUF file.

    Alpaca differs from LLaMA only in its weights (an instruction fine-tune)
    and the prompt it expects, which is the registry's business, not the file's.
    """
    return write_tiny_llama_gguf(path, seed=seed, context_length=context_length)


def write_tiny_cerebras_gpt_ggml(path: Path, *, seed: int = 0, context_length: int = 256) -> Path:
    """A tiny Cerebras-GPT in ggml's gpt-2 layout (``model_type="gpt2"``).

    Cerebras-GPT is GPT-2's architecture; ggml's converter for it writes the
    gpt-2 file with an explicit ``model/lm_head`` tensor.
    """
    _check_context(context_length)
    tokens = _byte_tokens() + _word_tokens() + [ENDOFTEXT.encode()]  # GPT-2 puts end-of-text last
    biases = _biases(tokens, specials={ENDOFTEXT.encode()})
    rng = np.random.default_rng(seed)
    hparams = [len(tokens), context_length, N_EMBD, N_HEAD, N_LAYER, _FTYPE_ALL_F32]
    tensors = _gpt2_tensors(rng, biases, context_length)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        _write_ggml(fh, hparams, tokens, tensors, vocab_count=True)
    return Path(path)


def write_tiny_dolly_v2_ggml(path: Path, *, seed: int = 0, context_length: int = 256) -> Path:
    """A tiny Dolly v2 in ggml's dolly-v2 (gpt-neox) layout (``model_type="dolly-v2"``)."""
    specials = [ENDOFTEXT, "<|padding|>", *DOLLY_SPECIALS]
    return _write_neox(path, seed, context_length, specials)


def write_tiny_stablelm_ggml(path: Path, *, seed: int = 0, context_length: int = 256) -> Path:
    """A tiny StableLM (alpha) in ggml's gpt-neox layout (``model_type="gpt_neox"``)."""
    return _write_neox(path, seed, context_length, [ENDOFTEXT, "<|padding|>"])


#: The Alpaca preamble; Dolly v2 was trained on the same one.
INSTRUCTION_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

#: Every family of the essay: name -> how to write and serve it.
FAMILIES: dict[str, Family] = {
    "llama": Family(write_tiny_llama_ggml, "llama", "GGUF", "plain: a base model continues any text"),
    "alpaca": Family(
        write_tiny_alpaca_ggml,
        "llama",
        "GGUF",
        "alpaca: preamble + '\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:' (stop at '### Instruction:')",
    ),
    "cerebras-gpt": Family(
        write_tiny_cerebras_gpt_ggml, "gpt2", "GGML (legacy, gpt-2 layout)", "plain: a base model"
    ),
    "dolly-v2": Family(
        write_tiny_dolly_v2_ggml,
        "dolly-v2",
        "GGML (legacy, gpt-neox layout)",
        "alpaca-style: preamble + '\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n'; "
        "'### End' is end-of-sequence",
    ),
    "stablelm": Family(
        write_tiny_stablelm_ggml,
        "gpt_neox",
        "GGML (legacy, gpt-neox layout)",
        "plain for base-alpha; tuned-alpha wants '<|SYSTEM|>...<|USER|>...<|ASSISTANT|>'",
    ),
}


def family_file_name(family: str) -> str:
    """Conventional file name of a family's tiny model: GGUF or legacy ``.bin``."""
    suffix = ".gguf" if FAMILIES[family].file_format == "GGUF" else ".bin"
    return f"tiny-{family}{suffix}"


# --- vocabulary ------------------------------------------------------------


# Why the vocabulary is raw bytes: the converters of the time decode GPT-2's
# byte-level BPE alphabet back to bytes before writing, and ctransformers'
# tokenizer for these files (ggml's ``gpt_tokenize``) splits text with a
# GPT-2-style regex, then takes the longest vocabulary entry at each position.
# So the 256 single bytes make any text tokenizable and decodable, and whole
# words (with GPT-2's leading space) make the common case one token per word.
# No merges table is needed.
def _byte_tokens() -> list[bytes]:
    return [bytes([b]) for b in range(256)]


def _word_tokens() -> list[bytes]:
    """Whole words with GPT-2's leading space, deduplicated in first-seen order."""
    return [f" {w}".encode() for w in dict.fromkeys(_WORDS)]


def _biases(tokens: list[bytes], specials: Iterable[bytes]) -> np.ndarray:
    """Per-token output bias: words favoured, printable characters allowed, rest banned."""
    banned = set(specials)
    biases = np.empty(len(tokens), dtype=np.float32)
    for i, tok in enumerate(tokens):
        if tok in banned:
            biases[i] = _BIAS_BANNED
        elif len(tok) == 1:
            biases[i] = _BIAS_CHAR if 0x20 <= tok[0] < 0x7F else _BIAS_BANNED
        else:
            biases[i] = _BIAS_WORD
    return biases


# --- weights ---------------------------------------------------------------


class _Rand:
    """Seeded F32 tensors drawn in call order, so the seed fixes every weight."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def __call__(self, *shape: int, scale: float) -> np.ndarray:
        return (self._rng.standard_normal(shape) * scale).astype(np.float32)


def _final_norm() -> tuple[np.ndarray, np.ndarray]:
    """Final LayerNorm (weight, bias) pinning hidden dimension 0 to 1.

    Why the noise looks like words (the tiny llama's idea, done with the final
    layer norm instead of a reserved embedding channel): both architectures end
    with a LayerNorm that has a bias, so weight 0 and bias 1 in hidden dimension
    0 make that dimension exactly 1 for every token. Column 0 of the output
    matrix (:func:`_output`) is then a per-token logit bias: strongly negative
    for control tokens, non-ASCII bytes and end-of-text (greedy output never
    ends early and is printable), positive for whole words.
    """
    weight = np.ones(N_EMBD, dtype=np.float32)
    bias = np.zeros(N_EMBD, dtype=np.float32)
    weight[0], bias[0] = 0.0, 1.0
    return weight, bias


def _output(rand: _Rand, biases: np.ndarray) -> np.ndarray:
    out = rand(len(biases), N_EMBD, scale=0.4)
    out[:, 0] = biases
    return out


#: One transformer block's tensor names, in the order both converters write
#: them: two norms (weight, bias), then attention in, attention out, MLP up
#: and MLP down (each weight, bias).
_GPT2_BLOCK = (
    "ln_1/g", "ln_1/b", "ln_2/g", "ln_2/b", "attn/c_attn/w", "attn/c_attn/b",
    "attn/c_proj/w", "attn/c_proj/b", "mlp/c_fc/w", "mlp/c_fc/b", "mlp/c_proj/w", "mlp/c_proj/b",
)
_NEOX_BLOCK = (
    "input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
    "post_attention_layernorm.bias", "attention.query_key_value.weight", "attention.query_key_value.bias",
    "attention.dense.weight", "attention.dense.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)


def _block(rand: _Rand, prefix: str, names: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
    """One block's tensors under ``prefix`` + ``names``: unit norms, random projections (4x MLP)."""
    e = N_EMBD
    ones, zeros = np.ones(e, dtype=np.float32), np.zeros(e, dtype=np.float32)
    arrays = [
        ones, zeros, ones, zeros,
        rand(3 * e, e, scale=0.5), rand(3 * e, scale=0.1),
        rand(e, e, scale=0.3), rand(e, scale=0.1),
        rand(4 * e, e, scale=0.3), rand(4 * e, scale=0.1),
        rand(e, 4 * e, scale=0.3), rand(e, scale=0.1),
    ]
    return [(prefix + name, array) for name, array in zip(names, arrays, strict=True)]


def _gpt2_tensors(rng: np.random.Generator, biases: np.ndarray, n_ctx: int) -> list[tuple[str, np.ndarray]]:
    """gpt-2 tensors, numpy shape (out, in): the file lists dims innermost first."""
    rand = _Rand(rng)
    e, n_vocab = N_EMBD, len(biases)
    ln_f_g, ln_f_b = _final_norm()
    tensors = [
        ("model/ln_f/g", ln_f_g),
        ("model/ln_f/b", ln_f_b),
        ("model/wte", rand(n_vocab, e, scale=1.0)),
        ("model/wpe", rand(n_ctx, e, scale=1.0)),
        ("model/lm_head", _output(rand, biases)),
    ]
    for i in range(N_LAYER):
        tensors += _block(rand, f"model/h{i}/", _GPT2_BLOCK)
    return tensors


def _neox_tensors(rng: np.random.Generator, biases: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """gpt-neox tensors under their Hugging Face names, as ggml's converter keeps them."""
    rand = _Rand(rng)
    e, n_vocab = N_EMBD, len(biases)
    norm_w, norm_b = _final_norm()
    tensors = [("gpt_neox.embed_in.weight", rand(n_vocab, e, scale=1.0))]
    for i in range(N_LAYER):
        tensors += _block(rand, f"gpt_neox.layers.{i}.", _NEOX_BLOCK)
    tensors += [
        ("gpt_neox.final_layer_norm.weight", norm_w),
        ("gpt_neox.final_layer_norm.bias", norm_b),
        ("embed_out.weight", _output(rand, biases)),
    ]
    return tensors


def _write_neox(path: Path, seed: int, context_length: int, specials: list[str]) -> Path:
    """A gpt-neox file; specials first, as the NeoX tokenizer numbers them from 0."""
    _check_context(context_length)
    special_bytes = [s.encode() for s in specials]
    tokens = special_bytes + _byte_tokens() + _word_tokens()
    biases = _biases(tokens, specials=special_bytes)
    rng = np.random.default_rng(seed)
    par_res = 1  # Pythia (Dolly) and StableLM-alpha both use the parallel residual
    hparams = [len(tokens), context_length, N_EMBD, N_HEAD, N_LAYER, N_ROT, par_res, _FTYPE_ALL_F32]
    tensors = _neox_tensors(rng, biases)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        _write_ggml(fh, hparams, tokens, tensors, vocab_count=False)
    return Path(path)


# --- the file --------------------------------------------------------------


def _check_context(context_length: int) -> None:
    if context_length < 8:
        raise ValueError("context_length must be at least 8")


def _write_ggml(
    fh: BinaryIO,
    hparams: list[int],
    tokens: list[bytes],
    tensors: list[tuple[str, np.ndarray]],
    *,
    vocab_count: bool,
) -> None:
    """Legacy (unversioned) GGML: magic, hparams, vocabulary, tensors; no padding.

    Magic ``0x67676d6c``, int32 hyperparameters, the vocabulary as (uint32
    length, raw bytes) pairs (gpt-2 prefixes it with an int32 count, gpt-neox
    does not), then tensors, each (int32 n_dims, int32 name length, int32 type,
    int32 dims innermost first, name, raw data), with no alignment padding.
    Everything is little-endian F32 here (file type 0).
    """
    fh.write(struct.pack("<I", GGML_MAGIC))
    fh.write(struct.pack(f"<{len(hparams)}i", *hparams))
    if vocab_count:
        fh.write(struct.pack("<i", len(tokens)))
    for tok in tokens:
        fh.write(struct.pack("<I", len(tok)))
        fh.write(tok)
    for name, array in tensors:
        data = np.ascontiguousarray(array, dtype="<f4")
        encoded = name.encode()
        fh.write(struct.pack("<3i", data.ndim, len(encoded), _GGML_TYPE_F32))
        fh.write(struct.pack(f"<{data.ndim}i", *reversed(data.shape)))
        fh.write(encoded)
        fh.write(data.tobytes())
