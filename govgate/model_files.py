"""The model files ``govgate up`` needs: which to start first, and making missing ones.

govgate can write the tiny test model (its worker does, see
:func:`ensure_models`) and assemble the default model from its installed
package; any other missing file stops ``up`` before it starts anything, with
the file's name.
"""

from __future__ import annotations

from typing import Callable

from govgate.stack import StartupError
from workers.backends import ensure_model_file
from workers.contract.registry import GENERATE_GEMMA, GENERATE_TINY, ModelSpec, Registry


def start_order(registry: Registry) -> list[str]:
    """Model names, cheapest to load first: by file size; a missing file counts as
    large, except the tiny test model (govgate writes it in a moment)."""

    def size(spec: ModelSpec) -> float:
        try:
            return spec.path.stat().st_size
        except OSError:
            return 0 if spec.generate == GENERATE_TINY else float("inf")
    return [spec.name for spec in sorted(registry.models.values(), key=size)]


def ensure_models(registry: Registry, say: Callable[[str], None], progress_interval_s: float = 1.0) -> None:
    """Make the models govgate can make that are missing; refuse to start on other missing files.

    Assembling the default model writes 253 MB, which takes from under a
    second to a minute depending on the disk, so it reports progress (at most
    one line per ``progress_interval_s``: plain lines, because this output
    often goes to a log) and ends with the size, the time and the licence
    notice the Gemma terms ask to pass on.
    """
    from workers.default_model import GEMMA_NOTICE, Progress

    for spec in registry.models.values():
        if spec.path.exists():
            continue
        if spec.generate == GENERATE_TINY:
            # Its worker writes it (``govgate worker`` makes a missing model it can make, atomically):
            # the writer imports numpy and gguf, which this long-lived process should not carry.
            say(f"  the tiny test model {spec.name} is written by its worker to {spec.path}")
            continue
        if spec.generate != GENERATE_GEMMA:
            if spec.generate:
                ensure_model_file(spec)  # an unknown generator: raises BackendError naming it
            raise StartupError(f"model {spec.name}: file {spec.path} does not exist")

        package = spec.generate.removeprefix("pypi:")
        say(f"  assembling model {spec.name} from the installed package {package} into {spec.path} …")
        last_line_at = 0.0
        final: Progress | None = None

        def report(progress: Progress) -> None:
            nonlocal last_line_at, final
            if progress.done >= progress.total:
                final = progress
            elif progress.elapsed_s - last_line_at >= progress_interval_s:
                last_line_at = progress.elapsed_s
                say(f"    {progress.fraction:4.0%}  {progress.done / 1e6:.0f} of {progress.total / 1e6:.0f} MB")

        ensure_model_file(spec, report)
        if final is not None:
            rate = f" ({final.total / 1e6 / final.elapsed_s:.0f} MB/s)" if final.elapsed_s > 0 else ""
            say(f"  model {spec.name}: {final.total / 1e6:.0f} MB written and SHA-256 verified "
                f"in {final.elapsed_s:.1f}s{rate}")
        say(f"  {GEMMA_NOTICE}")
