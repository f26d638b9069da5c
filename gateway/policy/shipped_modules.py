"""The SHA-256 of each shipped policy module's text, as this version ships them.

:mod:`gateway.policy.vm_trust` lets the compiled VM answer a policy made of
these modules only. The digests are recorded here, in the package, rather
than read from a ``policies/`` folder at run time: that folder is also the
default ``GOVGATE_POLICY_DIR`` (and the one compose mounts over), so an
operator's ``custom.rego`` put there was read as "shipped" and answered on
the VM, builtin errors undefined (probe p3). A change to a shipped module
changes its digest here too: ``tests/policy/test_policy_vm.py`` compares
this table with ``policies/``, and ``python -m gateway.policy.shipped_modules``
prints the table for the current files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

SHIPPED_MODULE_DIGESTS: Final[dict[str, str]] = {
    "access.rego": "fd81cb2ea7f4d3587fc14ca1a0803b375e338bc1fc8018cea7164d3a407ad9b2",
    "calendar.rego": "201767b2519835c926f571ef3f3870cd8eace46c1d1054eb052bcd6aa93d2509",
    "checks.rego": "eebd4e3c43f2357176dc06f96537ef55447d87b6e4fb0f0480d785efc8ac3512",
    "content.rego": "a9ed9113fd9240c0043a994a7a0d19cfa226279de69d239f1ee2b42b72b81c00",
    "govgate.rego": "5a5d90a0fab0e819f461ff5119514cfee538ecf9d5d91f54d19177bbe5f8b1c7",
    "limits.rego": "cca16ca8878e5c86efafd5eab91f6e46d2f29a6ee34840daee3774362cc2724d",
    "obligations.rego": "a1af5a9a86ebd344d7b5a5e41490ecf8a71f30a4e9b31de38171fcca643d9e12",
    "output.rego": "2546c5c230dfb08e31fa0c649b79c66fff65812a04da9e243d768d5c67d8bfbb",
    "pii.rego": "53d7654caa31db1cb1c9fd2060475e5b2c9b75f31755ee156951638d0ca7515a",
    "purpose.rego": "4cd8362f6bed5397f115f59d0cea48caa929e42bfd5616c09a06f45ea7438129",
    "schedule.rego": "8d6789078318f85234bf883560916518b81de8f06de7125c30c8fbb22d62e44c",
}


def module_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def digests_of(folder: Path) -> dict[str, str]:
    """The table for the modules of ``folder`` (``*.rego`` but the ``*_test.rego``)."""
    return {path.name: module_digest(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.rego"))
            if not path.name.endswith("_test.rego")}


if __name__ == "__main__":
    for name, digest in digests_of(Path(__file__).resolve().parents[2] / "policies").items():
        print(f'    "{name}": "{digest}",')
