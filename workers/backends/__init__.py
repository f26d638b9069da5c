"""Model backends: load a registry entry into something that generates text.

Why a table of loader functions: each backend imports a heavy native library,
so it is imported only when a model of its kind is loaded; adding a backend
(llama.cpp next) is one function and one table entry here.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.backends.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    BackendError,
    Generation,
    GenerationParams,
    GenerationRun,
    LoadedModel,
    PromptTooLongError,
    check_model_file,
)
from workers.registry import ModelSpec

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "BackendError",
    "Generation",
    "GenerationParams",
    "GenerationRun",
    "LoadedModel",
    "PromptTooLongError",
    "check_model_file",
    "ensure_model_file",
    "load_model",
]


def _load_ctransformers(spec: ModelSpec) -> LoadedModel:
    from workers.backends.ctransformers_backend import CTransformersModel

    return CTransformersModel.load(spec)


_LOADERS: dict[str, Callable[[ModelSpec], LoadedModel]] = {
    "ctransformers": _load_ctransformers,
}


def ensure_model_file(spec: ModelSpec) -> None:
    """Write a generated model (``spec.generate``) if its file is missing.

    Why here: the built-in tiny model must appear on first use on a fresh
    machine without a separate setup step. Real models are never touched.
    """
    if not spec.generate or spec.path.exists():
        return
    if spec.generate != "tiny-llama":
        raise BackendError(f"model {spec.name}: unknown generator {spec.generate!r}")
    from workers.tinymodel import write_tiny_llama_gguf

    write_tiny_llama_gguf(spec.path, context_length=spec.context_length)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load ``spec`` with its backend; any failure is a :class:`BackendError`."""
    loader = _LOADERS.get(spec.backend)
    if loader is None:
        raise BackendError(f"model {spec.name}: unknown backend {spec.backend!r} (known: {sorted(_LOADERS)})")
    ensure_model_file(spec)
    return loader(spec)
