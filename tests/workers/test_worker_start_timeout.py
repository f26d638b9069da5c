"""``GOVGATE_WORKER_START_TIMEOUT_S``: how long a new pool process may take to load its model.

Celery kills a pool process that has not said it is up within
``worker_proc_alive_timeout`` (4 s by default) and starts another. Ours say
so only after loading the model, so on a busy machine a pool process that
replaced a crashed one was killed again and again and the worker never
served (seen in tests/e2e/test_fair_share.py's killed-pool test under a
load average of 9). The setting reaches the worker's Celery app from the
environment, through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import Settings, SettingsError
from tests.workers.worker_command import worker_configs
from workers.runtime import WorkerConfig, worker_app


def test_the_setting_is_read_bounded_and_reaches_a_child_process() -> None:
    assert Settings.from_env({}).worker_start_timeout_s == 300.0
    assert Settings.from_env({"GOVGATE_WORKER_START_TIMEOUT_S": "45"}).worker_start_timeout_s == 45.0
    assert Settings.from_env(Settings().with_(worker_start_timeout_s=12.5).to_env()).worker_start_timeout_s == 12.5
    for value in ("0", "-1", "nan", "inf", "86401"):
        with pytest.raises(SettingsError, match=f"GOVGATE_WORKER_START_TIMEOUT_S='{value}'.*at most 86400"):
            Settings.from_env({"GOVGATE_WORKER_START_TIMEOUT_S": value})


def test_the_workers_celery_app_waits_as_long_for_a_pool_process(tiny_spec) -> None:
    app = worker_app(WorkerConfig(model=tiny_spec, redis_url="redis://127.0.0.1:1/0", database_url="sqlite://",
                                  start_timeout_s=42.0))
    assert app.conf.worker_proc_alive_timeout == 42.0
    default = worker_app(WorkerConfig(model=tiny_spec, redis_url="redis://127.0.0.1:1/0", database_url="sqlite://"))
    assert default.conf.worker_proc_alive_timeout == Settings().worker_start_timeout_s


def test_the_worker_command_passes_the_setting_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = worker_configs(tmp_path, monkeypatch, {"GOVGATE_WORKER_START_TIMEOUT_S": "75"})
    assert [config.start_timeout_s for config in started] == [75.0]
