"""Merge the benches' JSON files into one document, with the machine they ran on (``make bench``).

``make bench`` runs each bench with ``--json bench/results/<name>.json``,
then this script writes ``bench/results/latest.json``: every bench's
document under its name, the benches that were asked for but left no file
(failed, or not present in this checkout), and the machine (CPU model,
cores, RAM, load, Python, git commit, date). Figures without the machine
they came from cannot be compared, which is why the README's Performance
section quotes this file and not a terminal.

Usage::

    .venv/bin/python bench/collect.py [--results bench/results] [--out bench/results/latest.json] NAME...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _cpuinfo_field(name: str, text: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """What the figures depend on: the hardware, the load it was under, the code that ran."""
    mem_kb = _cpuinfo_field("MemTotal", _read("/proc/meminfo"))
    loadavg = _read("/proc/loadavg").split()[:3]
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    return {
        "cpu_model": _cpuinfo_field("model name", _read("/proc/cpuinfo")) or platform.processor() or None,
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(int(mem_kb.split()[0]) / 1024 / 1024, 1) if mem_kb else None,
        "loadavg_at_end": [float(x) for x in loadavg] or None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def collect(names: list[str], results: Path) -> dict[str, Any]:
    """The merged document: ``machine``, ``benches`` (name -> its document), ``missing`` names."""
    benches: dict[str, Any] = {}
    missing: list[str] = []
    for name in names:
        path = results / f"{name}.json"
        try:
            benches[name] = json.loads(path.read_text())
        except (OSError, ValueError):
            missing.append(name)
    return {"machine": machine(), "benches": benches, "missing": missing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help="bench names: bench/<name>.py wrote <results>/<name>.json")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--out", type=Path, default=None, help="default: <results>/latest.json")
    args = parser.parse_args(argv)
    document = collect(args.names, args.results)
    out = args.out or args.results / "latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"{out}: {', '.join(document['benches']) or 'no bench'} on {document['machine']['cpu_model']}"
          + (f"; missing: {', '.join(document['missing'])}" if document["missing"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
