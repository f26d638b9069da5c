"""Where an ``opa`` binary is: the one ``make opa`` built, else one on PATH.

One rule for the CLI (``govgate policy test``), the test fixtures and the
benchmarks, so they never disagree about which OPA they run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Where ``make opa`` puts the binary.
LOCAL_OPA = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "opa"


def find_opa() -> Path | None:
    """``.tools/bin/opa`` if built, else ``opa`` on PATH, else None."""
    if LOCAL_OPA.is_file() and os.access(LOCAL_OPA, os.X_OK):
        return LOCAL_OPA
    found = shutil.which("opa")
    return Path(found) if found else None
