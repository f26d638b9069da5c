"""Tokens a model may generate that are markers, not text: they never reach a client.

Decided from the GGUF vocabulary's token types, because the backends do not
agree on what they print; the rules and examples are in docs/architecture.md,
"Design notes by package" (workers). A hidden token still counts as a
completion token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from workers.contract.modelfile import (GGUF_MAGIC, TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED, ModelFileError,
                                        file_magic, read_gguf_metadata)
from workers.contract.tokenizers import CONTROL_LOOKING

_MARKER = re.compile(r"<\|[^|<>\s]+\|>|<[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+>|\[[A-Za-z_]+\]")


def is_marker(text: str) -> bool:
    """Whether a user-defined token spelled ``text`` is a marker rather than text."""
    return text in CONTROL_LOOKING or _MARKER.fullmatch(text) is not None


@dataclass(frozen=True)
class HiddenTokens:
    """The token ids that are never shown, and the texts of those a backend may print anyway."""

    ids: frozenset[int] = frozenset()
    #: Spellings of the hidden user-defined markers: llama.cpp hides control and
    #: unknown tokens but prints user-defined ones verbatim (Gemma's
    #: ``<start_of_image>``), and the ctransformers build prints unknown ones as "▅".
    texts: tuple[bytes, ...] = ()
    _pattern: re.Pattern[bytes] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.texts:
            longest_first = sorted(self.texts, key=len, reverse=True)
            object.__setattr__(self, "_pattern", re.compile(b"|".join(re.escape(t) for t in longest_first)))

    def strip(self, piece: bytes) -> bytes:
        """``piece`` (one generated token's bytes, as a backend rendered it) without marker text."""
        return piece if self._pattern is None or not piece else self._pattern.sub(b"", piece)


def hidden_tokens(path: Path) -> HiddenTokens:
    """What of ``path``'s vocabulary must not reach a client (nothing for a file without token types)."""
    try:
        if file_magic(Path(path)) != GGUF_MAGIC:
            return HiddenTokens()
        meta = read_gguf_metadata(Path(path), {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"})
    except (OSError, ModelFileError):
        return HiddenTokens()
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if not tokens or types is None or len(types) != len(tokens):
        return HiddenTokens()
    ids, texts = set(), []
    for token_id, (raw, kind) in enumerate(zip(tokens, types)):
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            ids.add(token_id)
        elif kind == TOKEN_USER_DEFINED and raw and is_marker(raw.decode("utf-8", "replace")):
            ids.add(token_id)
            texts.append(raw)
    return HiddenTokens(frozenset(ids), tuple(texts))
