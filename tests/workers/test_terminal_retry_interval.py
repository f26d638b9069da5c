"""``GOVGATE_TERMINAL_RETRY_INTERVAL_S``: how often gateways and pool processes look for kept terminal entries.

It was a constant (5 s in both), so a test whose fallback entry is written by
a retry (a gateway killed before it recorded a handed-over output, jobs ended
while no gateway waited for them) waited up to 5 s for the next look. The
setting reaches the workers through the CLI and the gateway through its
components (``gateway/components.py``), and each pool process's retry thread
(``workers/pool.py``) sleeps that long between two looks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import Settings
from tests.workers.worker_command import worker_configs


def test_the_setting_is_read_and_reaches_a_child_process() -> None:
    assert Settings.from_env({}).terminal_retry_interval_s == 5.0
    assert Settings.from_env({"GOVGATE_TERMINAL_RETRY_INTERVAL_S": "0.5"}).terminal_retry_interval_s == 0.5
    spelled_out = Settings().with_(terminal_retry_interval_s=0.25).to_env()  # as child_env hands it on
    assert Settings.from_env(spelled_out).terminal_retry_interval_s == 0.25


def test_the_worker_command_passes_the_setting_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = worker_configs(tmp_path, monkeypatch, {"GOVGATE_TERMINAL_RETRY_INTERVAL_S": "0.75"})
    assert [config.terminal_retry_interval_s for config in started] == [0.75]
