"""A pytest plugin: tests marked ``slow`` run only when ``GOVGATE_RUN_SLOW=1``.

Why opt-in: they need the 253 MB default model or minutes of running, and
``make test`` must stay quick on a fresh two-core machine. Load it from the
suite's conftest with ``pytest_plugins = ("tests.slow_marker",)``.
"""

from __future__ import annotations

import os

import pytest

#: The environment variable that turns the slow tests on.
RUN_SLOW_ENV = "GOVGATE_RUN_SLOW"


def run_slow() -> bool:
    return os.environ.get(RUN_SLOW_ENV, "").strip() == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if run_slow():
        return
    skip = pytest.mark.skip(reason=f"slow: set {RUN_SLOW_ENV}=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
