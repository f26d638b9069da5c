"""What ``govgate worker`` hands the worker: its ``WorkerConfig`` as built from the environment.

For the tests of settings that reach a worker through the CLI: the command
runs for real (Click's runner), up to the point where it would start the
worker, which is recorded instead of run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import govgate.cli
import workers.runtime
from workers.contract.registry import TINY_MODEL_NAME
from workers.runtime import WorkerConfig


def worker_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> list[WorkerConfig]:
    """The configs ``govgate worker --model <tiny>`` would run a worker with, given ``env`` (GOVGATE_*)."""
    started: list[WorkerConfig] = []
    monkeypatch.setattr(workers.runtime, "run_worker", started.append)
    monkeypatch.setattr(govgate.cli, "_configure_logging", lambda settings: None)  # this process's logging stays
    base = {"GOVGATE_VAR_DIR": str(tmp_path), "GOVGATE_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = CliRunner().invoke(govgate.cli.main, ["worker", "--model", TINY_MODEL_NAME], env={**base, **env},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return started
