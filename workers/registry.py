"""The model registry: which models exist, where their files are, how to load them.

Operators describe models in a TOML file (``GOVGATE_MODELS_FILE``), one table
per model, so adding any GGUF/GGML file on disk needs no code::

    [models.tiny]
    backend = "ctransformers"     # the loader to use
    path = "var/models/tiny.gguf" # relative paths are taken from the file's folder
    model_type = "llama"          # ctransformers architecture name
    context_length = 256
    threads = 1
    family = "llama"
    tags = ["test"]
    prompt_format = "plain"       # how chat messages become a prompt

Without a file the registry holds one model, ``govgate-tiny``: a tiny random
llama written by govgate on first run so every layer can be exercised with no
download. Its text is noise.

The gateway reads the registry too (model names, families, tags for policy
input), so this module stays import-light: no backend is imported here.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

#: Name of the built-in model used when no registry file is configured.
TINY_MODEL_NAME = "govgate-tiny"

_BACKENDS = {"ctransformers"}
_PROMPT_FORMATS = {"plain", "chatml"}


class RegistryError(ValueError):
    """The registry file is missing, unreadable or describes a model wrongly."""


@dataclass(frozen=True)
class ModelSpec:
    """One servable model. ``queue`` is where its requests are sent."""

    name: str
    path: Path
    backend: str = "ctransformers"
    model_type: str = "llama"
    context_length: int = 256
    threads: int = 1
    family: str = "llama"
    tags: tuple[str, ...] = ()
    prompt_format: str = "plain"
    #: When set, govgate writes the file itself if missing (only "tiny-llama").
    generate: str = ""

    @property
    def queue(self) -> str:
        return f"model.{self.name}"

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


def default_registry(var_dir: Path) -> Registry:
    """The registry used when no file is configured: the generated tiny llama."""
    spec = ModelSpec(
        name=TINY_MODEL_NAME,
        path=var_dir / "models" / "govgate-tiny-llama.gguf",
        backend="ctransformers",
        model_type="llama",
        context_length=1024,
        threads=1,
        family="llama",
        tags=("tiny", "noise"),
        generate="tiny-llama",
    )
    return Registry({spec.name: spec})


def load_registry(models_file: str | Path | None, var_dir: Path) -> Registry:
    """Read the TOML registry at ``models_file``, or the default one if it is empty."""
    if not models_file:
        return default_registry(var_dir)
    path = Path(models_file).expanduser()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"model registry {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"model registry {path} cannot be read: {exc}") from None
    tables = raw.get("models")
    if not isinstance(tables, dict) or not tables:
        raise RegistryError(f"model registry {path} has no [models.<name>] tables")
    models = {name: _spec_from_table(name, table, path.parent) for name, table in tables.items()}
    return Registry(models)


def _spec_from_table(name: str, table: object, base: Path) -> ModelSpec:
    where = f"[models.{name}]"
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
    path = Path(str(values.pop("path"))).expanduser()
    values["path"] = path if path.is_absolute() else (base / path).resolve()
    values["tags"] = tuple(str(t) for t in values.get("tags", ()))
    for key in ("context_length", "threads"):
        if key in values and (not isinstance(values[key], int) or values[key] < 1):
            raise RegistryError(f"{where}: {key} must be a positive integer")
    spec = ModelSpec(name=name, **values)
    if spec.backend not in _BACKENDS:
        raise RegistryError(f"{where}: backend {spec.backend!r} is not one of {sorted(_BACKENDS)}")
    if spec.prompt_format not in _PROMPT_FORMATS:
        raise RegistryError(f"{where}: prompt_format {spec.prompt_format!r} is not one of {sorted(_PROMPT_FORMATS)}")
    return spec
