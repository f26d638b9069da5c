"""Tiny models of every supported family, as a plain module tests can import.

Why a registry writer here: the gateway tests drive models by registry name,
so one call gives them every family as a real file behind a real TOML
registry, exactly as an operator would describe real models.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.contract.registry import ModelSpec
from workers.tinyggml import FAMILIES, family_file_name

#: Context of every family's tiny model. The legacy GGML loaders take the
#: context from the file, so registry entries must agree with what was written.
FAMILY_CONTEXT = 256

#: Chat prompt format per family (instruction-tuned families use Alpaca's layout).
PROMPT_FORMATS = {"alpaca": "alpaca", "dolly-v2": "alpaca"}

#: Registry name of each family's tiny model.
MODEL_NAMES: dict[str, str] = {family: f"tiny-{family}" for family in FAMILIES}


def write_family_files(folder: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write every family's tiny model into ``folder``; returns family -> path."""
    folder = Path(folder)
    return {
        family: entry.writer(folder / family_file_name(family), seed=seed, context_length=FAMILY_CONTEXT)
        for family, entry in FAMILIES.items()
    }


def family_spec(family: str, path: Path, *, name: str | None = None) -> ModelSpec:
    """The registry entry serving ``path`` as a model of ``family``."""
    return ModelSpec(
        name=name or MODEL_NAMES[family],
        path=Path(path),
        backend="ctransformers",
        model_type=FAMILIES[family].model_type,
        context_length=FAMILY_CONTEXT,
        threads=1,
        family=family,
        tags=("tiny", "noise"),
    )


def write_family_registry(folder: Path) -> Path:
    """Write every family's tiny model and a TOML registry naming them; returns the TOML path.

    Models are named ``tiny-llama``, ``tiny-alpaca``, ``tiny-cerebras-gpt``,
    ``tiny-dolly-v2`` and ``tiny-stablelm``; paths are relative to the
    registry's folder, as operators usually write them.
    """
    folder = Path(folder)
    paths = write_family_files(folder)
    tables = []
    for family, path in paths.items():
        tables.append(
            f"[models.{MODEL_NAMES[family]}]\n"
            f'backend = "ctransformers"\n'
            f'path = "{path.name}"\n'
            f'model_type = "{FAMILIES[family].model_type}"\n'
            f"context_length = {FAMILY_CONTEXT}\n"
            f"threads = 1\n"
            f'family = "{family}"\n'
            f'tags = ["tiny", "noise"]\n'
            f'prompt_format = "{PROMPT_FORMATS.get(family, "plain")}"\n'
        )
    registry = folder / "models.toml"
    registry.write_text("\n".join(tables), encoding="utf-8")
    return registry


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every family's tiny model (seed 0), written once per test session."""
    return write_family_files(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def family_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TOML registry serving every family's tiny model (see :func:`write_family_registry`)."""
    return write_family_registry(tmp_path_factory.mktemp("family-registry"))
