"""Reading model-file headers: GGUF metadata and tensor table, legacy GGML vocabulary and tensors.

One reader for the gateway (counting prompt tokens from a file's vocabulary)
and the workers (checking a file before a C loader trusts it); no tensor data
is ever read. Not ``gguf.GGUFReader`` (far too slow to open on the request
path), and nothing heavy is imported at module level. See docs/architecture.md,
section "workers/backends and model files".
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

__all__ = [
    "GGML_LAYOUTS",
    "GGML_MAGIC",
    "GGUF_MAGIC",
    "TOKEN_CONTROL",
    "TOKEN_NORMAL",
    "TOKEN_UNKNOWN",
    "TOKEN_USER_DEFINED",
    "GgmlHeader",
    "GgmlLayout",
    "ModelFileError",
    "UnsupportedGgufVersion",
    "check_ggml_file",
    "check_gguf_extent",
    "file_magic",
    "ggml_layout",
    "is_ggml",
    "read_ggml_header",
    "read_gguf_metadata",
]

GGUF_MAGIC = b"GGUF"
GGML_MAGIC = 0x67676D6C
#: GGUF token types (``tokenizer.ggml.token_type``).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4

_GGUF_STRING, _GGUF_ARRAY = 8, 9
#: GGUF scalar value types: struct format.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
#: Arrays read with :mod:`array` (one call, no per-item Python work).
_ARRAY_CODES = {4: "I", 5: "i", 6: "f"}
_ALIGNMENT_KEY = "general.alignment"
_DEFAULT_ALIGNMENT = 32
_MAX_VOCAB = 10_000_000


class ModelFileError(ValueError):
    """The model file cannot be read as the format it claims to be."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


class UnsupportedGgufVersion(ModelFileError):
    """A GGUF version this reader does not know (0, or one after 3)."""


def file_magic(path: Path) -> bytes:
    """The first four bytes of ``path`` (fewer for a shorter file)."""
    with open(path, "rb") as fh:
        return fh.read(4)


def is_ggml(magic: bytes) -> bool:
    """Whether ``magic`` opens a legacy (unversioned) GGML file."""
    return len(magic) == 4 and struct.unpack("<I", magic)[0] == GGML_MAGIC


# --- GGUF ------------------------------------------------------------------------


def read_gguf_metadata(path: Path, wanted: set[str] | None = None) -> dict[str, Any]:
    """The key/value metadata of a GGUF (v1 to v3) file; tensors are never touched.

    ``wanted`` limits which keys are decoded (others are skipped by length),
    so a 262k-token vocabulary costs one pass over its strings. String
    arrays come back as lists of ``bytes``; numeric arrays as lists.
    """
    return _read_gguf(path, wanted, with_tensors=False)[0]


def check_gguf_extent(path: Path) -> None:
    """Raise :class:`ModelFileError` unless every tensor of the GGUF file lies inside it.

    Walks the metadata and the tensor table (no tensor data); a truncated
    copy fails here instead of reading past the end of a memory map later.
    """
    size = path.stat().st_size
    _, data_start, tensors = _read_gguf(path, {_ALIGNMENT_KEY}, with_tensors=True)
    try:
        end = max((offset + _tensor_bytes(kind, dims) for dims, kind, offset in tensors), default=0)
    except (KeyError, ValueError) as exc:
        raise ModelFileError(path, f"unknown tensor type ({exc})") from None
    if data_start + end > size:
        raise ModelFileError(path, f"tensor data needs {data_start + end} bytes but the file has {size}")


def _read_gguf(path: Path, wanted: set[str] | None, *, with_tensors: bool) -> tuple[dict[str, Any], int, list]:
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelFileError(path, "not a GGUF file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse_gguf(buf, path, wanted, with_tensors)
            except ModelFileError:
                raise
            except (struct.error, IndexError, KeyError, ValueError) as exc:
                raise ModelFileError(path, f"unreadable GGUF header ({exc})") from None


def _parse_gguf(buf: Any, path: Path, wanted: set[str] | None, with_tensors: bool) -> tuple[dict[str, Any], int, list]:
    """(metadata, offset of the tensor data, [(dims, type, offset)]) of a mapped GGUF file."""
    unpack_from = struct.unpack_from
    size = len(buf)
    (version,) = unpack_from("<I", buf, 4)
    if version not in (1, 2, 3):
        raise UnsupportedGgufVersion(path, f"GGUF version {version} is not supported")
    # GGUF v1 wrote counts, lengths and tensor dimensions as 32-bit integers, v2 on as 64-bit ones.
    count = "I" if version == 1 else "Q"
    count_size = struct.calcsize("<" + count)
    n_tensors, n_kv = unpack_from(f"<{count}{count}", buf, 8)
    off = 8 + 2 * count_size
    out: dict[str, Any] = {}
    # The file check rejects a key that is not UTF-8 (damage); metadata readers never did.
    key_errors = "strict" if with_tensors else "replace"

    def string_at(o: int) -> tuple[bytes, int]:
        (n,) = unpack_from("<" + count, buf, o)
        o += count_size
        if o + n > size:
            raise ValueError("string runs past the end of the file")
        return buf[o : o + n], o + n

    def skip(vtype: int, o: int) -> int:
        if vtype == _GGUF_STRING:
            return o + count_size + unpack_from("<" + count, buf, o)[0]
        if vtype == _GGUF_ARRAY:
            item, n = unpack_from("<I" + count, buf, o)
            o += 4 + count_size
            if item in _GGUF_SCALARS:
                return o + struct.calcsize("<" + _GGUF_SCALARS[item]) * n
            for _ in range(n):
                o = skip(item, o)
                if o > size:
                    raise ValueError("array runs past the end of the file")
            return o
        return o + struct.calcsize("<" + _GGUF_SCALARS[vtype])

    for _ in range(n_kv):
        key_bytes, off = string_at(off)
        key = key_bytes.decode("utf-8", key_errors)
        (vtype,) = unpack_from("<I", buf, off)
        off += 4
        if wanted is not None and key not in wanted:
            off = skip(vtype, off)
        elif vtype == _GGUF_STRING:
            value, off = string_at(off)
            out[key] = value.decode("utf-8", "replace")
        elif vtype == _GGUF_ARRAY:
            item, n_items = unpack_from("<I" + count, buf, off)
            off += 4 + count_size
            if item == _GGUF_STRING:
                items = []
                append = items.append
                for _ in range(n_items):
                    (n,) = unpack_from("<" + count, buf, off)
                    off += count_size
                    append(buf[off : off + n])
                    off += n
                if off > size:
                    raise ValueError("string array runs past the end of the file")
                out[key] = items
            elif item in _ARRAY_CODES:
                arr = array(_ARRAY_CODES[item])
                end = off + arr.itemsize * n_items
                if end > size:
                    raise ValueError("array runs past the end of the file")
                arr.frombytes(buf[off:end])
                if array("I", [1]).tobytes()[0] != 1:  # big-endian host
                    arr.byteswap()
                out[key] = arr.tolist()
                off = end
            else:
                off = skip(_GGUF_ARRAY, off - 4 - count_size)
        else:
            fmt = "<" + _GGUF_SCALARS[vtype]
            (out[key],) = unpack_from(fmt, buf, off)
            off += struct.calcsize(fmt)
        if off > size:
            raise ValueError("metadata runs past the end of the file")
    if not with_tensors:
        return out, 0, []
    tensors = []
    for _ in range(n_tensors):
        name, off = string_at(off)
        name.decode("utf-8")  # a name that is not UTF-8 means a damaged table
        (n_dims,) = unpack_from("<I", buf, off)
        dims = unpack_from(f"<{n_dims}{count}", buf, off + 4)
        kind, offset = unpack_from("<IQ", buf, off + 4 + count_size * n_dims)
        off += 4 + count_size * n_dims + 12
        tensors.append((dims, kind, offset))
    alignment = out.get(_ALIGNMENT_KEY, _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1:
        raise ValueError(f"alignment {alignment!r}")
    return out, -(-off // alignment) * alignment, tensors


#: (elements per block, bytes per block) of the ggml tensor types by type id: F32, F16, the Q*, K-quant,
#: IQ*, integer, BF16, ternary and FP4 types, as ``gguf.constants.GGML_QUANT_SIZES`` (gguf 0.19) has them.
#: A fact about the format, kept here so that checking a model file does not import gguf: its package
#: imports numpy, ~11 MB that would stay resident in a worker that never uses it. A type not listed
#: (one newer than this table) is looked up in gguf after all; tests/workers/contract hold the two equal.
GGML_TYPE_SIZES: Final[dict[int, tuple[int, int]]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}


def _tensor_bytes(kind: int, dims: tuple[int, ...]) -> int:
    """Bytes one tensor of ggml type ``kind`` and shape ``dims`` takes."""
    sizes = GGML_TYPE_SIZES.get(kind)
    if sizes is None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        sizes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    block, type_size = sizes
    return math.prod(dims) // block * type_size


# --- legacy GGML -----------------------------------------------------------------


@dataclass(frozen=True)
class GgmlLayout:
    """How one legacy GGML family (the ``ggml`` examples of mid-2023) lays out its file."""

    n_hparams: int
    #: Whether the vocabulary starts with its own count (gpt-2 does, gpt-neox does not).
    vocab_count: bool
    tensor_prefixes: tuple[str, ...]


#: Keyed as ctransformers matches model types ('-' and '_' dropped).
GGML_LAYOUTS: dict[str, GgmlLayout] = {
    "gpt2": GgmlLayout(6, True, ("model/",)),
    "gptneox": GgmlLayout(8, False, ("gpt_neox.", "embed_out.")),
    "dollyv2": GgmlLayout(8, False, ("gpt_neox.", "embed_out.")),
}


def ggml_layout(model_type: str) -> GgmlLayout | None:
    """The layout of ``model_type``'s legacy GGML files, if it is one govgate knows."""
    return GGML_LAYOUTS.get(model_type.replace("-", "").replace("_", ""))


@dataclass(frozen=True)
class GgmlHeader:
    """Hyperparameters (n_vocab first) and vocabulary of a legacy GGML file."""

    hparams: tuple[int, ...]
    vocab: list[bytes]


def read_ggml_header(path: Path, layout: GgmlLayout) -> GgmlHeader:
    """Magic, hyperparameters and vocabulary of a legacy GGML file laid out as ``layout``."""
    with open(path, "rb") as fh:
        return _read_ggml_header(fh, path, layout)


def check_ggml_file(path: Path, layout: GgmlLayout) -> None:
    """Raise :class:`ModelFileError` unless ``path`` is laid out as ``layout`` expects.

    Checks the hyperparameters are plausible, reads the vocabulary, and walks
    the tensor table without reading tensor data: every name must carry one of
    the layout's prefixes, and the last tensor must end the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header = _read_ggml_header(fh, path, layout)
        _check_hparams(path, header.hparams)
        try:
            tensors = _walk_ggml_tensors(fh, size, layout.tensor_prefixes)
        except (struct.error, ValueError, KeyError) as exc:
            raise ModelFileError(path, str(exc)) from None
    if not tensors:
        raise ModelFileError(path, "no tensors")


def _read_ggml_header(fh: BinaryIO, path: Path, layout: GgmlLayout) -> GgmlHeader:
    try:
        (magic,) = _read(fh, "<I")
        if magic != GGML_MAGIC:
            raise ModelFileError(path, f"magic {magic:#010x} is not legacy GGML's {GGML_MAGIC:#010x}")
        hparams = _read(fh, f"<{layout.n_hparams}i")
        n_vocab = hparams[0]
        if layout.vocab_count:
            (count,) = _read(fh, "<i")
            if count != n_vocab:
                raise ModelFileError(path, f"vocabulary count {count} != n_vocab {n_vocab}")
        if not 0 < n_vocab <= _MAX_VOCAB:
            raise ModelFileError(path, f"implausible n_vocab {n_vocab}")
        vocab: list[bytes] = []
        read = fh.read
        size = os.fstat(fh.fileno()).st_size
        for _ in range(n_vocab):
            (length,) = _read(fh, "<I")
            word = read(min(length, size))  # a damaged length must not allocate gigabytes
            if len(word) != length:
                raise ModelFileError(path, "vocabulary runs past the end of the file")
            vocab.append(word)
    except struct.error:
        raise ModelFileError(path, "truncated GGML header or vocabulary") from None
    return GgmlHeader(hparams, vocab)


def _check_hparams(path: Path, hparams: tuple[int, ...]) -> None:
    n_vocab, _n_ctx, n_embd, n_head, _n_layer = hparams[:5]
    if min(hparams[:5]) < 1 or n_embd % n_head:
        raise ModelFileError(path, f"implausible hyperparameters {list(hparams)}")
    if len(hparams) == 8 and not (0 < hparams[5] <= n_embd // n_head and hparams[6] in (0, 1)):
        raise ModelFileError(path, f"implausible n_rot/par_res {list(hparams[5:7])}")


def _walk_ggml_tensors(fh: BinaryIO, size: int, prefixes: tuple[str, ...]) -> int:
    """Tensors in the table from the current position to the end of the file."""
    tensors = 0
    while fh.tell() < size:
        n_dims, name_len, kind = _read(fh, "<3i")
        if not (1 <= n_dims <= 4 and 0 < name_len <= 256):
            raise ValueError(f"tensor record {tensors} is malformed")
        dims = _read(fh, f"<{n_dims}i")
        name = fh.read(name_len).decode("utf-8")
        if not name.startswith(prefixes) or min(dims) < 1:
            raise ValueError(f"unexpected tensor {name!r} {list(dims)}")
        fh.seek(_tensor_bytes(kind, dims), 1)
        if fh.tell() > size:
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        tensors += 1
    return tensors


def _read(fh: BinaryIO, fmt: str) -> tuple[Any, ...]:
    """``fmt`` unpacked from the next bytes; :class:`struct.error` at the end of the file."""
    return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))
