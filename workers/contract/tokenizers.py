"""Pure-Python token counters that reproduce the worker backends exactly.

The gateway must refuse a prompt that cannot fit a model's context before
queueing it, without the model: the two tokenizers the backends use
(:class:`SpmTokenizer`, :class:`GgmlTokenizer`) are re-implemented from the
file's vocabulary alone (``None`` for any other kind, rather than a guess),
importing nothing heavy (no numpy, gguf, ctransformers or xllamacpp). See
docs/architecture.md, section "workers/backends and model files".
"""

from __future__ import annotations

import heapq
import re
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from workers.contract.modelfile import (
    GGUF_MAGIC,
    TOKEN_NORMAL,
    TOKEN_USER_DEFINED,
    ModelFileError,
    file_magic,
    ggml_layout,
    is_ggml,
    read_ggml_header,
    read_gguf_metadata,
)
from workers.contract.registry import BACKEND_CTRANSFORMERS, BACKEND_LLAMACPP, ModelSpec

__all__ = [
    "CONTROL_LOOKING",
    "GgmlTokenizer",
    "SpmTokenizer",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
]

_SPACE = "\u2581"  # SentencePiece's visible space
#: Texts current llama.cpp treats as control tokens whatever the file says (its
#: end-of-generation and fill-in-the-middle detection by text overrides the
#: type, logging "control-looking token ... will be overridden"), so they are
#: never split out as user-defined tokens. Gemma 3 marks "</s>" user-defined
#: and llama.cpp does not split it; the rest is llama.cpp's list as of 2025-26.
CONTROL_LOOKING = frozenset(
    {
        "</s>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
        "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|eom_id|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_utterance>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "<|plamo:eos|>", "<|ifm|im_end|>",
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "\u2581<PRE>",
        "<|code_prefix|>", "<|prefix|>", "<|plamo:fim_prefix|>",
        "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "\u2581<SUF>",
        "<|code_suffix|>", "<|suffix|>", "<|plamo:fim_suffix|>",
        "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "\u2581<MID>",
        "<|code_middle|>", "<|middle|>", "<|plamo:fim_middle|>",
        "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
        "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
        "<|file_sep|>", "<|plamo:file_separator|>",
    }
)
#: Word memo entries kept per tokenizer before it is emptied (bounds memory).
#: Nothing is cached at module level; each tokenizer keeps its own memo.
_MEMO_LIMIT = 100_000


#: What an unreadable model file raises (the name the gateway catches).
TokenizerError = ModelFileError


class Tokenizer(Protocol):
    def count(self, text: str) -> int:
        """Context slots ``text`` takes as a prompt, exactly as the backend counts them."""
        ...


_SPM_KEYS = {
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
}


# --- SentencePiece-style (llama.cpp SPM) ---------------------------------------


class SpmTokenizer:
    """llama.cpp's SPM tokenizer (``llm_tokenizer_spm``) over a GGUF ``llama`` vocabulary.

    For GGUF files whose ``tokenizer.ggml.model`` is ``"llama"`` (SentencePiece
    vocabularies). Two flavours, because the backends embed llama.cpp from
    different years:

    - ``llama.cpp`` backend (current llama.cpp, via its ``/tokenize`` with
      ``add_special`` and without ``parse_special``): user-defined tokens
      (type 4) found in the text are split out first, longest first (control
      and unknown tokens are not: they are plain text); each raw fragment gets
      a space prefix when ``tokenizer.ggml.add_space_prefix`` (default true)
      and it starts the text or follows a user-defined token; BOS when
      ``add_bos_token`` (default true), EOS when ``add_eos_token``.
    - ``ctransformers`` backend (llama.cpp of August 2023): BOS always, a
      space prefix always (that version ignores ``add_space_prefix``), no
      user-defined token splitting.

    Then spaces become "▁", symbols start as UTF-8 characters, and the adjacent
    pair whose concatenation is a vocabulary token with the highest score is
    merged (ties: leftmost) until none is left; a final symbol that is not a
    token costs one byte-fallback token per UTF-8 byte.

    ``scores`` maps every token text to the score of the id llama.cpp's
    text-to-id map holds for it (the last id when a text repeats).
    ``user_defined`` lists the texts split out before tokenizing, in the order
    they are tried (longest first); empty for the ctransformers flavour.
    """

    def __init__(
        self,
        scores: dict[str, float],
        *,
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        user_defined: tuple[str, ...] = (),
    ) -> None:
        self._scores = scores
        self._specials_total = int(add_bos) + int(add_eos)
        self._add_space_prefix = add_space_prefix
        self._user_defined = user_defined
        self._user_first_chars = frozenset(t[0] for t in user_defined)
        self._memo: dict[str, int] = {}
        # Pieces of text that no merge can cross: a "▁" that follows a
        # character c != "▁" starts a new piece unless some token holds
        # "c▁" (merges only ever build vocabulary tokens). Pieces are
        # tokenized independently and memoized; the result is the same as
        # running the merge loop over the whole text.
        crossing = sorted(
            {tok[i - 1] for tok in scores if _SPACE in tok[1:] for i in range(1, len(tok))
             if tok[i] == _SPACE and tok[i - 1] != _SPACE}
        )
        excluded = re.escape(_SPACE) + "".join(re.escape(c) for c in crossing)
        self._splitter = re.compile(f"(?<=[^{excluded}])(?={_SPACE})")

    def count(self, text: str) -> int:
        total = self._specials_total
        if not text:
            return total
        prefix_next = True  # the text starts, or a user-defined token came before
        for fragment in self._partition(text):
            if fragment is None:
                total += 1
                prefix_next = True
                continue
            if self._add_space_prefix and prefix_next:
                fragment = " " + fragment
            prefix_next = False
            total += self._count_escaped(fragment.replace(" ", _SPACE))
        return total

    def _partition(self, text: str) -> list[str | None]:
        """Raw text pieces, with ``None`` where a user-defined token was split out."""
        if not self._user_defined or self._user_first_chars.isdisjoint(text):
            return [text]
        fragments: list[str | None] = [text]
        for special in self._user_defined:
            if not any(f is not None and special in f for f in fragments):
                continue
            split: list[str | None] = []
            for fragment in fragments:
                if fragment is None or special not in fragment:
                    split.append(fragment)
                    continue
                parts = fragment.split(special)
                for i, part in enumerate(parts):
                    if i:
                        split.append(None)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    def _count_escaped(self, text: str) -> int:
        return _memo_sum(self._memo, self._splitter.split(text), self._merge_count)

    def _merge_count(self, text: str) -> int:
        """Tokens of one piece: llm_tokenizer_spm's merge loop, then byte fallback."""
        scores = self._scores
        n = len(text)
        if n == 1:
            return 1 if text in scores else len(text.encode("utf-8", "surrogatepass"))
        sym = list(text)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        get = scores.get
        for i in range(n - 1):
            pair = sym[i] + sym[i + 1]
            score = get(pair)
            if score is not None:
                heap.append((-score, i, i + 1, 2))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, left, right, size = pop(heap)
            ls, rs = sym[left], sym[right]
            if not ls or not rs or len(ls) + len(rs) != size:
                continue  # one side was merged since this pair was queued
            merged = ls + rs
            sym[left], sym[right] = merged, ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
            before = prv[left]
            if before >= 0:
                pair = sym[before] + merged
                score = get(pair)
                if score is not None:
                    push(heap, (-score, before, left, len(pair)))
            if after >= 0:
                pair = merged + sym[after]
                score = get(pair)
                if score is not None:
                    push(heap, (-score, left, after, len(pair)))
        total = 0
        i = 0
        while i != -1:
            s = sym[i]
            total += 1 if s in scores else len(s.encode("utf-8", "surrogatepass"))
            i = nxt[i]
        return total


def _load_spm(spec: ModelSpec) -> SpmTokenizer | None:
    meta = read_gguf_metadata(spec.path, _SPM_KEYS)
    if meta.get("tokenizer.ggml.model") != "llama":
        return None
    raw_tokens = meta.get("tokenizer.ggml.tokens")
    if not raw_tokens:
        return None
    n = len(raw_tokens)
    tokens = [t.decode("utf-8", "surrogateescape") for t in raw_tokens]
    raw_scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    if raw_scores is None or len(raw_scores) != n:
        return None  # llama.cpp would score every merge 0; not worth guessing
    if types is None or len(types) != n:
        types = [TOKEN_NORMAL] * n
    scores = dict(zip(tokens, raw_scores))  # last id wins, as llama.cpp's map
    if any(f"<0x{b:02X}>" not in scores for b in range(256)):
        return None  # llama.cpp's fallback for a missing byte token is not reproduced
    if spec.backend == BACKEND_LLAMACPP:
        by_length: dict[int, list[str]] = {}
        for tok, kind in zip(tokens, types):
            if kind == TOKEN_USER_DEFINED and tok and tok not in CONTROL_LOOKING:
                by_length.setdefault(len(tok.encode("utf-8", "surrogateescape")), []).append(tok)
        user_defined = tuple(t for length in sorted(by_length, reverse=True) for t in by_length[length])
        return SpmTokenizer(
            scores,
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            user_defined=user_defined,
        )
    if spec.backend == BACKEND_CTRANSFORMERS:
        bos = meta.get("tokenizer.ggml.bos_token_id", 1)
        return SpmTokenizer(scores, add_bos=bos != -1, add_eos=False, add_space_prefix=True)
    return None


# --- legacy GGML (ggml's gpt_tokenize) -----------------------------------------

#: Instruction markers ggml's dolly-v2 tokenizer splits out before the regex.
_GGML_SPECIALS: dict[str, tuple[bytes, ...]] = {"dollyv2": (b"### End", b"### Instruction:", b"### Response:")}
#: ggml's GPT-2 split, as std::regex runs it in the C locale over bytes.
_GPT2_SPLIT = re.compile(
    rb"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
)


class GgmlTokenizer:
    """ggml's ``gpt_tokenize`` as ctransformers 0.2.27 runs it, for legacy GGML files.

    The gpt-2, gpt-neox and dolly-v2 layouts of mid-2023: the GPT-2 regex split
    in the C locale, then greedy longest-prefix matching per word (dolly-v2
    first splits out its three instruction markers). ctransformers adds no BOS
    to these, but the backend sends an empty prompt as one start token, so the
    count is never below 1.
    """

    def __init__(self, vocab: set[bytes], specials: tuple[bytes, ...] = ()) -> None:
        self._vocab = vocab
        self._max_len = max((len(t) for t in vocab), default=0)
        self._specials = re.compile(b"|".join(re.escape(s) for s in specials)) if specials else None
        self._memo: dict[bytes, int] = {}

    def count(self, text: str) -> int:
        data = text.encode("utf-8", "surrogatepass")
        total = 0
        if self._specials is not None:
            start = 0
            for m in self._specials.finditer(data):
                total += self._count_words(data[start : m.start()])
                total += self._word_count(m.group())
                start = m.end()
            data = data[start:]
        total += self._count_words(data)
        return total or 1  # the backend sends an empty prompt as one start token

    def _count_words(self, data: bytes) -> int:
        return _memo_sum(self._memo, _GPT2_SPLIT.findall(data), self._word_count)

    def _word_count(self, word: bytes) -> int:
        vocab, max_len = self._vocab, self._max_len
        n, i, total = len(word), 0, 0
        while i < n:
            for j in range(min(n, i + max_len), i, -1):
                if word[i:j] in vocab:
                    total += 1
                    i = j
                    break
            else:
                i += 1  # a byte with no token: ggml logs it and drops it
        return total


def _load_ggml(spec: ModelSpec) -> GgmlTokenizer | None:
    model_type = spec.model_type.lower()
    layout = ggml_layout(model_type)
    if layout is None:
        return None
    header = read_ggml_header(spec.path, layout)
    specials = _GGML_SPECIALS.get(model_type.replace("-", "").replace("_", ""), ())
    return GgmlTokenizer(set(header.vocab), specials)


# --- entry point ---------------------------------------------------------------


def _memo_sum(memo: dict, pieces: Iterable, count: Callable[[Any], int]) -> int:
    """Sum ``count`` over ``pieces``, remembering each piece's count (the memo is emptied when full)."""
    total = 0
    for piece in pieces:
        n = memo.get(piece)
        if n is None:
            n = count(piece)
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            memo[piece] = n
        total += n
    return total


def load_tokenizer(spec: ModelSpec) -> Tokenizer | None:
    """A counter equal to ``load_model(spec).count_tokens`` for ``spec``, or ``None``.

    ``None`` means the file kind is not reproduced exactly (other GGUF
    tokenizer models such as ``"gpt2"`` BPE, other GGML layouts): the caller
    must then leave the check to the worker rather than guess. A missing file
    gives ``None`` too.
    A file that claims a supported format but is unreadable raises
    :class:`TokenizerError`.
    """
    path = Path(spec.path)
    if not path.is_file():
        return None
    magic = file_magic(path)
    if magic == GGUF_MAGIC:
        return _load_spm(spec)
    if spec.backend == BACKEND_CTRANSFORMERS and is_ggml(magic):
        return _load_ggml(spec)
    return None
