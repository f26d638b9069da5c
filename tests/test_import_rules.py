"""The package rules of docs/architecture.md, read from the import graph.

``gateway`` may import ``audit`` and ``workers.contract`` but no other part
of ``workers``; ``workers`` never imports ``gateway``; ``workers.contract``
imports no other part of ``workers``; ``audit`` imports neither side; only
``govgate`` (the launchers) sits above all three; ``gateway.requests`` does not
import the controllers in ``gateway.api``. Every ``import`` counts,
including those inside functions, so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

#: package folder → (prefixes it may import despite ``forbidden``, prefixes it may not import)
RULES = {
    "gateway": (("workers.contract",), ("workers", "govgate")),
    # The request path is used by the controllers, never the other way round.
    "gateway/requests": (("workers.contract",), ("workers", "govgate", "gateway.api")),
    "workers": ((), ("gateway", "govgate")),
    "workers/contract": (("workers.contract",), ("workers", "gateway", "govgate")),
    "audit": ((), ("gateway", "workers", "govgate")),
}


def imported_modules(folder: str) -> list[tuple[str, str]]:
    """(file, absolute module name) for every import statement under ``folder``."""
    found: list[tuple[str, str]] = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.extend((str(path.relative_to(ROOT)), alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((str(path.relative_to(ROOT)), node.module))
    return found


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def breaking(edges: list[tuple[str, str]], allowed: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """The edges that import a forbidden package and are not explicitly allowed."""
    return [f"{file} imports {module}" for file, module in edges
            if _under(module, forbidden) and not _under(module, allowed)]


@pytest.mark.parametrize("folder", sorted(RULES))
def test_package_imports_follow_the_rules(folder: str):
    allowed, forbidden = RULES[folder]
    edges = imported_modules(folder)
    assert edges, f"no imports found under {folder}: the scan is broken"
    assert breaking(edges, allowed, forbidden) == []


def test_a_breaking_import_is_reported():
    """The rule check itself can fail: a gateway module reaching into the worker runtime is caught."""
    allowed, forbidden = RULES["gateway"]
    edges = [("gateway/x.py", "workers.contract.jobs"), ("gateway/x.py", "workers.runtime"),
             ("gateway/x.py", "workersmith")]
    assert breaking(edges, allowed, forbidden) == ["gateway/x.py imports workers.runtime"]


#: What the API process must not load: Celery is the workers' (the gateway writes its task messages itself,
#: gateway/dispatch/celery_message.py); loaded, it stayed resident there for a few constants (docs/performance.md).
WORKERS_ONLY = ("celery", "kombu", "billiard", "amqp", "workers.contract.celery_config",
                "workers.contract.kombu_redis", "workers.contract.deferred_replies")


def test_the_gateway_imports_no_celery():
    """Not directly (every import statement under gateway/, lazy ones too), nor through what it imports."""
    assert breaking(imported_modules("gateway"), (), WORKERS_ONLY) == []
    script = ("import sys, gateway.app, govgate.cli\n"
              f"print(sorted(m for m in sys.modules if m.split('.')[0] in {WORKERS_ONLY[:4]!r} "
              f"or m in {WORKERS_ONLY[4:]!r}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
