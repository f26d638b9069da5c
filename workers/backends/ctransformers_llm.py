"""ctransformers' model class (``ctransformers.llm``) without the Hugging Face hub client.

``import ctransformers`` runs the package's ``__init__``, which imports its
``hub`` module and with it ``huggingface_hub`` (``HfApi``,
``snapshot_download``) and that library's HTTP stack: about 8 MB of every
ctransformers worker's memory (measured in a served worker,
docs/performance.md), for downloads a worker never makes. Everything govgate uses
lives in ``llm.py`` (``LLM``, ``Config``), which needs only the package's
``lib``, ``logger`` and ``utils`` modules.

So the package's directory is loaded under a private name whose package
module is made without running ``__init__``: ``llm.py``'s relative imports
resolve inside it, and the real ``ctransformers`` package, should anything
else import it, is left untouched (both map the same shared library). pyproject
allows 0.2.x only, and 0.2.27 is the last release (the project is
archived), so the layout read here does not move under us; a layout it does
not find is a :class:`ModuleNotFoundError` naming the module.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

#: The private package name the directory is loaded under.
PACKAGE = "_govgate_ctransformers"

_lock = threading.Lock()


def package_dir() -> Path:
    """Where the installed ctransformers package lives (found without importing it)."""
    spec = importlib.util.find_spec("ctransformers")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("ctransformers is not installed", name="ctransformers")
    return Path(next(iter(spec.submodule_search_locations)))


def llm_module() -> ModuleType:
    """ctransformers' ``llm`` module (``LLM``, ``Config``), loaded once, without ``huggingface_hub``."""
    with _lock:
        loaded = sys.modules.get(f"{PACKAGE}.llm")
        if loaded is not None:
            return loaded
        directory = package_dir()
        package = ModuleType(PACKAGE, "ctransformers' package directory, its __init__ not run (hub-free)")
        package.__path__ = [str(directory)]
        package.__package__ = PACKAGE
        package.__spec__ = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        package.__spec__.submodule_search_locations = package.__path__
        sys.modules[PACKAGE] = package
        try:
            return importlib.import_module(f"{PACKAGE}.llm")
        except BaseException:
            for name in [name for name in sys.modules if name == PACKAGE or name.startswith(f"{PACKAGE}.")]:
                del sys.modules[name]
            raise
