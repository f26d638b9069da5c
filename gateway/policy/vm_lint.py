"""Constructs regorus's compiled VM answers differently on, found in a policy's text before it is trusted.

The VM is checked against the interpreter on sampled answers (:mod:`gateway.policy.vm`), but a sample
misses an input that reaches a faulty construct only now and then. Three of the VM's known faults
(docs/architecture.md, "What a decision costs") have a shape that can be read off the module's text as
``opa fmt`` writes it, so a policy holding one is answered by the interpreter alone, and the log says
where: a body that binds with ``:=`` (the VM binds an undefined value), an ``else`` after a body that
iterates (the VM leaves it undefined), and a function ``default`` (the VM ignores it). The shipped
modules hold none (tests/policy/test_policy_vm.py). The other faults (an undefined argument in a ``_``
place, an undefined head term of a comprehension) cannot be read off the text; the sampled checks and
the case table are what stand against them.
"""

from __future__ import annotations

import re

#: A body line binding a variable with ``:=`` (a rule's own ``:=`` starts at column 0).
_BODY_ASSIGNMENT = re.compile(r"^\s+[a-z_][A-Za-z0-9_]*\s*:=")
#: A statement that iterates: ``some x in``, ``some k, v in``, ``some i``, ``x[_]``.
_ITERATES = re.compile(r"^\s*some\b|\[_\]")
#: A function's default: ``default f(_) := v``.
_FUNCTION_DEFAULT = re.compile(r"^default\s+[A-Za-z_][A-Za-z0-9_.]*\(")


def vm_hazards(modules: list[tuple[str, str]]) -> list[str]:
    """``file:line: what`` for each construct of ``modules`` (name, text) the VM answers differently on."""
    found = []
    for name, text in modules:
        body: list[str] | None = None
        for number, line in enumerate(text.splitlines(), 1):
            if _FUNCTION_DEFAULT.match(line):
                found.append(f"{name}:{number}: a function's default")
            if body is not None and line.startswith("}"):
                if line.startswith("} else") and any(_ITERATES.search(statement) for statement in body):
                    found.append(f"{name}:{number}: an else after a body that iterates")
                body = None
            elif body is not None:
                body.append(line)
                if _BODY_ASSIGNMENT.match(line):
                    found.append(f"{name}:{number}: a body binding with := (write =)")
            if line.rstrip().endswith("{") and re.search(r"\bif\s*\{$|\belse\b.*\{$", line.rstrip()):
                body = []
    return found
