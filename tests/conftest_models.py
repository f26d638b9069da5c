"""Shared model fixtures, as a plain module the suite's conftest can import.

Why a session-scoped file: writing the tiny model takes tens of milliseconds,
but every backend test needs one, and one file per session keeps tests honest
about determinism (all of them see the same bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from audit import AuditStore, make_engine, migrate
from workers.backends import LoadedModel, load_model
from workers.contract.registry import ModelSpec
from workers.tinymodel import write_tiny_llama_gguf

TINY_CONTEXT = 256


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama GGUF (seed 0, context 256) written once per test session."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", context_length=TINY_CONTEXT)


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_path: Path) -> ModelSpec:
    """A registry entry for :func:`tiny_model_path` served by ctransformers."""
    return ModelSpec(
        name="tiny-test",
        path=tiny_model_path,
        backend="ctransformers",
        model_type="llama",
        context_length=TINY_CONTEXT,
        threads=1,
        tags=("test",),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    """A fresh SQLite audit store for tests that run worker jobs in-process."""
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    migrate(engine)
    yield AuditStore(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def model(tiny_spec: ModelSpec) -> LoadedModel:
    """The tiny model loaded once per test module."""
    return load_model(tiny_spec)
