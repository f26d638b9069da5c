"""``GOVGATE_REDELIVERY_MARGIN_S``: the broker's visibility timeout over the hard limit, in every process.

The worker that restores a dead worker's unacknowledged task applies its own
visibility timeout (kombu's restore runs in the consumers), so the setting
must reach the worker's Celery app; the gateway uses the same figure to warn
when a redelivered task would come after the request timeout and to know
when an accepted request without an end counts as lost. The whole-worker
rescue itself is tests/e2e/test_crash_safety.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway.requests.lost_requests import MARGIN_S, lost_after_s
from gateway.settings import Settings, SettingsError
from workers.contract.celery_config import make_celery
from workers.contract.queue_layout import HARD_LIMIT_GRACE_S, visibility_timeout_s
from workers.contract.registry import ModelSpec
from workers.runtime import WorkerConfig, build_worker_app


def _visibility(app) -> float:
    try:
        return app.conf.broker_transport_options["visibility_timeout"]
    finally:
        app.close()


def test_the_setting_is_read_and_defaults_to_thirty_seconds() -> None:
    assert Settings.from_env({}).redelivery_margin_s == 30.0
    assert Settings.from_env({"GOVGATE_REDELIVERY_MARGIN_S": " 4.5 "}).redelivery_margin_s == 4.5
    assert Settings.from_env({"GOVGATE_REDELIVERY_MARGIN_S": ""}).redelivery_margin_s == 30.0
    assert Settings.from_env(Settings().with_(redelivery_margin_s=7.25).to_env()).redelivery_margin_s == 7.25


@pytest.mark.parametrize(("value", "problem"), [("0", "more than 0"), ("-1", "more than 0"),
                                                ("later", "not a number"), ("nan", "more than 0"),
                                                ("inf", "more than 0"), ("86401", "at most 86400")])
def test_unusable_values_are_refused_naming_the_variable(value: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=f"GOVGATE_REDELIVERY_MARGIN_S='{value}'.*{problem}"):
        Settings.from_env({"GOVGATE_REDELIVERY_MARGIN_S": value})


def test_the_visibility_timeout_is_soft_limit_grace_and_margin() -> None:
    assert visibility_timeout_s(3.0) == 3.0 + HARD_LIMIT_GRACE_S + 30.0  # the default margin
    assert visibility_timeout_s(3.0, 4.0) == 3.0 + HARD_LIMIT_GRACE_S + 4.0
    assert _visibility(make_celery("redis://127.0.0.1:1/0", time_limit_s=3.0)) == 43.0
    app = make_celery("redis://127.0.0.1:1/0", time_limit_s=3.0, redelivery_margin_s=4.0)
    assert app.conf.task_time_limit == 13.0  # the hard limit stays where it was: only the margin moves
    assert _visibility(app) == 17.0


def test_a_worker_restores_with_its_configured_margin(tmp_path: Path) -> None:
    spec = ModelSpec(name="m", path=tmp_path / "m.gguf")
    config = WorkerConfig(model=spec, redis_url="redis://127.0.0.1:1/0", database_url="sqlite://",
                          time_limit_s=2.0, redelivery_margin_s=5.0)
    assert _visibility(build_worker_app(config)) == 17.0


def test_the_gateway_counts_a_request_lost_after_the_same_redelivery() -> None:
    assert lost_after_s(15.0, 2.0) == 15.0 + visibility_timeout_s(2.0) + MARGIN_S
    assert lost_after_s(15.0, 2.0, 5.0) == 15.0 + 2.0 + HARD_LIMIT_GRACE_S + 5.0 + MARGIN_S


def test_the_gateway_warns_only_when_redelivery_comes_after_the_request_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    from gateway.components import warn_if_redelivery_is_late

    for margin, warned in ((30.0, True), (17.9, False), (18.0, True), (5.0, False)):  # 2 + 10 + margin vs 30
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gateway.components"):
            warn_if_redelivery_is_late(Settings(request_timeout_s=30.0, generation_time_limit_s=2.0,
                                                redelivery_margin_s=margin))
        assert ("GOVGATE_REDELIVERY_MARGIN_S" in caplog.text) is warned, (margin, caplog.text)
