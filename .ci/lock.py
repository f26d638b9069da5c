"""Write constraints.txt: the exact versions `make up`, `make test` and the image install.

pyproject.toml says which versions govgate can work with (ranges); constraints.txt
says which ones it was tested with. Without it a fresh machine resolves the newest
release in every range, so a minor release of any of ~115 packages published after
the last green run is what CI (and a user's `make up`) would get first: the suite
passed on one set and the product ships another. With it, `pip install -c` installs
the tested set, and moving to newer releases is a change of its own (this script,
then `make test`, then a commit of both), visible in the history.

Run through `make lock`. It asks pip for a fresh resolution of govgate with every
extra (`--dry-run --ignore-installed --report`: nothing is installed, the venv is
not read), for this Python and platform, and writes every package of it but
govgate itself, sorted by name. Markers are not kept: the file is the resolution of
the platform govgate is developed and tested on (Linux, CPython 3.11+); pip applies
a constraint only to a package something requires, so a pin for a package another
platform does not need is ignored there.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
EXTRAS = "dev,client"

HEADER = """\
# The exact versions govgate is tested with: `make up`, `make test` and the image
# install with `pip install -c constraints.txt`. pyproject.toml keeps the ranges
# govgate supports; this file, the set the last green `make test` ran on.
# Written by `make lock` (.ci/lock.py): a fresh resolution of '.[{extras}]' on
# CPython {python} ({platform}). Do not edit by hand: run `make lock`, then
# `make test` (the stamp reinstalls the venv from this file), and commit both.
"""


def normalized(name: str) -> str:
    """PEP 503's normal form, the one pip compares names in."""
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve() -> dict[str, str]:
    """pip's resolution of govgate with every extra: {normalized name: version}."""
    with tempfile.TemporaryDirectory(prefix="govgate-lock-") as folder:
        report = Path(folder) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "-e", f".[{EXTRAS}]"], cwd=ROOT, check=True)
        installs = json.loads(report.read_text(encoding="utf-8"))["install"]
    return {normalized(item["metadata"]["name"]): item["metadata"]["version"] for item in installs
            if normalized(item["metadata"]["name"]) != "govgate"}


def render(pins: dict[str, str]) -> str:
    header = HEADER.format(extras=EXTRAS, python=".".join(map(str, sys.version_info[:3])), platform=sys.platform)
    return header + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


def main() -> int:
    before = CONSTRAINTS.read_text(encoding="utf-8") if CONSTRAINTS.exists() else ""
    old = dict(line.split("==", 1) for line in before.splitlines() if line and not line.startswith("#"))
    pins = resolve()
    CONSTRAINTS.write_text(render(pins), encoding="utf-8")
    changed = sorted(name for name in set(old) | set(pins) if old.get(name) != pins.get(name))
    for name in changed if old else ():
        print(f"{name}: {old.get(name, '(new)')} -> {pins.get(name, '(gone)')}")
    print(f"constraints.txt: {len(pins)} packages, {len(changed)} changed" + ("; now run `make test`" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
