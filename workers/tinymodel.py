"""A tiny random-weight llama GGUF that govgate writes itself.

Well under a megabyte, loaded in milliseconds, so every layer (queue, worker,
backend, streaming, audit) can be tested on a clean machine with no
download. Its metadata is ordinary llama metadata, so both ctransformers'
bundled loader and a current llama.cpp read it. See docs/architecture.md,
section "workers/backends and model files".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

from workers.atomic_file import atomic_path

#: Shape of the model: small enough to load and run in milliseconds.
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
RMS_EPS = 1e-5

#: Value held by hidden dimension 0 in every embedding. Why the noise looks
#: like words: dimension 0 is a constant "bias channel" that no layer writes to
#: (``attn_output``/``ffn_down`` have a zero row 0), so after the final RMS norm
#: it is always positive, and column 0 of ``output.weight`` is then a per-token
#: bias: strongly negative for control and byte tokens (greedy output is never
#: ``</s>`` or a raw control byte), positive for whole words (see ``_weights``).
#: The rest of the weights are plain seeded random numbers.
_BIAS_CHANNEL = 4.0

#: Output biases, scaled by the (positive) normalised bias channel. Banned
#: tokens land hundreds of logits below the rest: never picked, even sampling.
_BIAS_BANNED = -200.0
_BIAS_WORD = 6.0
_BIAS_CHAR = -6.0
_BIAS_PREFIX = -8.0
#: Special tokens added by ``markers``: favoured enough that greedy output picks them now and then.
_BIAS_MARKER = 20.0

_SPECIALS = (("<unk>", TokenType.UNKNOWN), ("<s>", TokenType.CONTROL), ("</s>", TokenType.CONTROL))
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

#: Whole words the vocabulary holds (as "▁word"); the noise is made of these.
_WORDS = """
the of and to in is it you that he was for on are with as his they be at one
have this from or had by hot word but what some we can out other were all there
when up use your how said an each she which do their time if will way about many
then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give
our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set
three want air well also play small end put home read hand port large spell add
even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self
earth father head stand own page should country found answer school grow study
still learn plant cover food sun four between state keep eye never last let
thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north gate model policy token queue
audit worker request prompt local secret allow deny rule trust log chain hash
""".split()


def write_tiny_llama_gguf(path: Path, *, seed: int = 0, context_length: int = 256,
                          markers: tuple[tuple[str, TokenType], ...] = ()) -> Path:
    """Write the tiny llama to ``path`` (atomically) and return ``path``.

    The same ``seed`` always gives a byte-identical file, so tests and workers
    that each write their own copy get the same model. The file appears under
    its final name only once complete (temp file + rename): a worker that
    crashes mid-write or a reader racing it never sees a truncated model.

    ``markers`` appends special tokens (text, type) that the model favours as
    much as a word, so greedy output holds some: how tests see that control
    and marker tokens (Gemma's ``<start_of_image>``) never reach a client.
    Without markers the file is the usual tiny llama.
    """
    path = Path(path)
    if context_length < 8:
        raise ValueError("context_length must be at least 8")
    tokens, scores, types, biases = _vocabulary()
    for text, kind in markers:
        tokens.append(text)
        scores.append(0.0)
        types.append(int(kind))
        biases.append(_BIAS_MARKER)
    tensors = _weights(np.random.default_rng(seed), biases)

    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, arch="llama")
        _write_metadata(writer, context_length, tokens, scores, types)
        for name, array in tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _write_metadata(
    writer: GGUFWriter, context_length: int, tokens: list[str], scores: list[float], types: list[int]
) -> None:
    """Plain llama metadata: what llama.cpp-family loaders require to build the graph."""
    writer.add_name("govgate-tiny-llama")
    writer.add_description("Random weights written by govgate for tests; its output is noise.")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_context_length(context_length)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _vocabulary() -> tuple[list[str], list[float], list[int], list[float]]:
    """Tokens, scores, types and output biases, in llama's usual order.

    Order: the three specials, the 256 byte tokens (the tokenizer's fallback
    for anything else, and llama.cpp looks up ``<0x0A>`` for newline), then
    printable pieces. Every prefix of a word piece is in the vocabulary too,
    because the SentencePiece-style tokenizer only merges adjacent pieces whose
    concatenation exists: without the prefixes no word could ever be formed
    from its letters.
    """
    tokens = [t for t, _ in _SPECIALS]
    types = [int(k) for _, k in _SPECIALS]
    biases = [_BIAS_BANNED] * len(_SPECIALS)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(int(TokenType.BYTE))
        biases.append(_BIAS_BANNED)

    pieces: dict[str, float] = {"\u2581": _BIAS_CHAR}
    for code in range(0x21, 0x7F):
        pieces[chr(code)] = _BIAS_CHAR
    for word in _WORDS:
        full = "\u2581" + word
        for end in range(2, len(full)):
            pieces.setdefault(full[:end], _BIAS_PREFIX)
        pieces[full] = _BIAS_WORD
    for piece, bias in pieces.items():
        tokens.append(piece)
        types.append(int(TokenType.NORMAL))
        biases.append(bias)

    # Longer pieces score higher so the tokenizer prefers merging into them.
    scores = [0.0] * (len(_SPECIALS) + 256) + [float(len(p)) - 100.0 for p in pieces]
    return tokens, scores, types, biases


def _weights(rng: np.random.Generator, biases: list[float]) -> list[tuple[str, np.ndarray]]:
    """Seeded random F32 tensors, numpy shape (out, in) as GGUF expects.

    Drawn in a fixed order from one generator so the seed fully determines them.
    """
    n_vocab = len(biases)

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embd = rand(n_vocab, N_EMBD, scale=1.0)
    embd[:, 0] = _BIAS_CHANNEL

    tensors: list[tuple[str, np.ndarray]] = [("token_embd.weight", embd)]
    for i in range(N_LAYER):
        attn_norm = np.ones(N_EMBD, dtype=np.float32)
        attn_norm[0] = 0.0  # the bias channel is not content
        wo = rand(N_EMBD, N_EMBD, scale=0.3)
        wo[0, :] = 0.0  # never write into the bias channel
        down = rand(N_EMBD, N_FF, scale=0.3)
        down[0, :] = 0.0
        ffn_norm = attn_norm.copy()
        tensors += [
            (f"blk.{i}.attn_norm.weight", attn_norm),
            (f"blk.{i}.attn_q.weight", rand(N_EMBD, N_EMBD, scale=0.5)),
            (f"blk.{i}.attn_k.weight", rand(N_EMBD, N_EMBD, scale=0.5)),
            (f"blk.{i}.attn_v.weight", rand(N_EMBD, N_EMBD, scale=0.5)),
            (f"blk.{i}.attn_output.weight", wo),
            (f"blk.{i}.ffn_norm.weight", ffn_norm),
            (f"blk.{i}.ffn_gate.weight", rand(N_FF, N_EMBD, scale=0.3)),
            (f"blk.{i}.ffn_up.weight", rand(N_FF, N_EMBD, scale=0.3)),
            (f"blk.{i}.ffn_down.weight", down),
        ]

    out = rand(n_vocab, N_EMBD, scale=0.4)
    out[:, 0] = np.asarray(biases, dtype=np.float32)
    tensors += [
        ("output_norm.weight", np.ones(N_EMBD, dtype=np.float32)),
        ("output.weight", out),
    ]
    return tensors
