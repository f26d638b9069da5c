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
shipped one (their digests are recorded in the package,
:mod:`gateway.policy.shipped_modules`: a module put into the default policy
folder beside them is not one) (the data, ``data.json``, may be anything: it is validated at
load), and ``on`` uses it for any policy, its builtin errors undefined as on
an OPA without strict builtin errors.
"""

from __future__ import annotations

from typing import Iterable

from gateway.policy.shipped_modules import SHIPPED_MODULE_DIGESTS, module_digest

#: The digests the VM trusts: this version's shipped modules (recorded in the package, not read from a folder).
_TRUSTED = frozenset(SHIPPED_MODULE_DIGESTS.values())


def unshipped_modules(modules: Iterable[tuple[str, str]]) -> list[str]:
    """The names of ``modules`` (name, text) whose text is not one of this version's shipped modules'."""
    return [name for name, text in modules if module_digest(text) not in _TRUSTED]
