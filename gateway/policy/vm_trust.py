"""Which policies regorus's compiled VM answers on by default: those made only of the shipped modules.

The VM reads a builtin error (a division by zero, ``to_number("x")``, a
builtin given the wrong type) as "this body is undefined", where the
interpreter raises it and the gateway denies (403 ``policy_error``). A
denial rule whose body hits one then does not fire on the VM and the request
is allowed: fail open, and only on the inputs that reach the error, which
the sampled checks against the interpreter (:mod:`gateway.policy.vm`) miss.
regorus's Python binding has no strict mode for the VM, and which bodies
can hit a builtin error cannot be read off a policy's text. The shipped
modules are compared with the interpreter on every case of the case table
and on fuzzed inputs (``bench/policy_vm_fuzz.py``), and they validate their
inputs before any builtin reads them; a module of an operator's is not. So
``GOVGATE_POLICY_VM=auto`` uses the VM only when every module's text is a
shipped one (the data, ``data.json``, may be anything: it is validated at
load), and ``on`` uses it for any policy, its builtin errors undefined as on
an OPA without strict builtin errors.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Iterable

#: The shipped policy folder, beside the packages.
SHIPPED_POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.cache
def shipped_module_digests() -> frozenset[str]:
    """The SHA-256 of each shipped module's text (``*.rego`` but the ``*_test.rego``); empty if not found."""
    try:
        paths = sorted(SHIPPED_POLICY_DIR.glob("*.rego"))
        return frozenset(_digest(path.read_text(encoding="utf-8")) for path in paths
                         if not path.name.endswith("_test.rego"))
    except OSError:
        return frozenset()


def unshipped_modules(modules: Iterable[tuple[str, str]]) -> list[str]:
    """The names of ``modules`` (name, text) whose text is not one of the shipped modules'."""
    shipped = shipped_module_digests()
    return [name for name, text in modules if _digest(text) not in shipped]
