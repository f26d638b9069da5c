"""``GOVGATE_WORKER_POOL`` and ``govgate worker --pool``: which Celery pool a worker runs, checked before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import govgate.cli
import workers.runtime
from gateway.settings import Settings, SettingsError
from workers.contract.registry import TINY_MODEL_NAME
from workers.runtime import POOL_PREFORK, POOL_SOLO, WorkerConfig, check_pool


def test_the_setting_defaults_to_solo_and_refuses_other_pools() -> None:
    assert Settings.from_env({}).worker_pool == POOL_SOLO
    assert Settings.from_env({"GOVGATE_WORKER_POOL": "Prefork"}).worker_pool == POOL_PREFORK
    assert Settings.from_env(Settings().with_(worker_pool="prefork").to_env()).worker_pool == POOL_PREFORK
    for value in ("threads", "gevent", "eventlet", "forked"):
        with pytest.raises(SettingsError, match="GOVGATE_WORKER_POOL"):
            Settings.from_env({"GOVGATE_WORKER_POOL": value})


def test_solo_runs_one_job_at_a_time(tiny_spec) -> None:
    config = WorkerConfig(model=tiny_spec, redis_url="redis://127.0.0.1:1/0", database_url="sqlite://",
                          pool=POOL_SOLO)
    check_pool(config)
    with pytest.raises(ValueError, match="one job at a time"):
        check_pool(WorkerConfig(model=tiny_spec, redis_url="redis://127.0.0.1:1/0", database_url="sqlite://",
                                pool=POOL_SOLO, concurrency=2))
    with pytest.raises(ValueError, match="unknown worker pool"):
        check_pool(WorkerConfig(model=tiny_spec, redis_url="redis://127.0.0.1:1/0", database_url="sqlite://",
                                pool="threads"))


def invoke_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str):
    started: list[WorkerConfig] = []
    monkeypatch.setattr(workers.runtime, "run_worker", started.append)  # the command's checks, not a worker
    monkeypatch.setattr(govgate.cli, "_configure_logging", lambda settings: None)
    env = {"GOVGATE_VAR_DIR": str(tmp_path), "GOVGATE_REDIS_URL": "redis://127.0.0.1:1/0", **env}
    result = CliRunner().invoke(govgate.cli.main, ["worker", "--model", TINY_MODEL_NAME, *args], env=env)
    return result, started


def test_the_worker_command_takes_the_setting_or_its_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, started = invoke_worker(tmp_path, monkeypatch, {"GOVGATE_WORKER_POOL": "solo"})
    assert result.exit_code == 0, result.output
    assert started[0].pool == POOL_SOLO
    result, started = invoke_worker(tmp_path, monkeypatch, {"GOVGATE_WORKER_POOL": "solo"}, "--pool", "prefork",
                                    "--concurrency", "2")
    assert result.exit_code == 0, result.output
    assert (started[0].pool, started[0].concurrency) == (POOL_PREFORK, 2)


def test_the_worker_command_refuses_solo_with_more_than_one_slot(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for args in (("--pool", "solo", "--concurrency", "3"), ("--concurrency", "2")):  # solo is the default
        result, started = invoke_worker(tmp_path, monkeypatch, {}, *args)
        assert result.exit_code != 0 and started == []
        assert "one job at a time" in result.output and "--pool prefork" in result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize("slots", ["0", "-3"])
def test_the_worker_command_refuses_fewer_than_one_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        slots: str) -> None:
    for pool in ("prefork", "solo"):
        result, started = invoke_worker(tmp_path, monkeypatch, {}, "--pool", pool, "--concurrency", slots)
        assert result.exit_code == 2 and started == []
        assert f"Invalid value for '--concurrency': {slots} is not in the range x>=1" in result.output


def _check_worker_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, field: str, *,
                       default: bool) -> None:
    """A yes/no ``GOVGATE_<name>`` setting: its default, both values through the environment and back, a
    refusal of anything else, and ``govgate worker`` handing it to the worker's config."""
    assert getattr(Settings.from_env({}), field) is default
    assert getattr(Settings.from_env({f"GOVGATE_{name}": "0" if default else "1"}), field) is not default
    assert getattr(Settings.from_env(Settings().with_(**{field: not default}).to_env()), field) is not default
    with pytest.raises(SettingsError, match=f"GOVGATE_{name}"):
        Settings.from_env({f"GOVGATE_{name}": "sometimes"})
    result, started = invoke_worker(tmp_path, monkeypatch, {f"GOVGATE_{name}": "off" if default else "on"})
    assert result.exit_code == 0, result.output
    assert getattr(started[0], field) is not default
    result, started = invoke_worker(tmp_path, monkeypatch, {})
    assert getattr(started[0], field) is default


def test_the_hand_over_rides_on_the_take_only_when_asked_and_only_on_the_solo_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_spec) -> None:
    """``GOVGATE_HANDOVER_ON_TAKE`` (on by default): a solo pool's job leaves its hand-over with the delivering
    channel only when it is on; a prefork pool process never does (its take is its parent's)."""
    from workers.contract.handover import delivering
    from workers.pool import hand_over_carrier_of

    _check_worker_flag(tmp_path, monkeypatch, "HANDOVER_ON_TAKE", "handover_on_take", default=True)

    def config(pool: str, on: bool) -> WorkerConfig:
        return WorkerConfig(model=tiny_spec, redis_url="redis://127.0.0.1:1/0", database_url="sqlite://", pool=pool,
                            handover_on_take=on)

    channel = object()  # what the transport sets as the delivery under way
    with delivering(channel):  # type: ignore[arg-type]
        assert hand_over_carrier_of(config(POOL_SOLO, True)) is channel
        assert hand_over_carrier_of(config(POOL_SOLO, False)) is None  # off: the job sends it itself
        assert hand_over_carrier_of(config(POOL_PREFORK, True)) is None
        assert hand_over_carrier_of(None) is None
    assert hand_over_carrier_of(config(POOL_SOLO, True)) is None  # no delivery under way


def test_a_fair_job_may_give_way_at_its_start_by_default_and_only_on_the_solo_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_spec) -> None:
    """``GOVGATE_FAIR_GIVE_WAY`` (on by default): a solo pool's job gets the ticket of the delivery under way
    when it is its own; off, or on a prefork pool process, none (its start claims as before)."""
    from workers.contract.repick import Ticket, offering
    from workers.pool import give_way_ticket_of

    _check_worker_flag(tmp_path, monkeypatch, "FAIR_GIVE_WAY", "fair_give_way", default=True)

    def config(pool: str, on: bool) -> WorkerConfig:
        return WorkerConfig(model=tiny_spec, redis_url="redis://127.0.0.1:1/0", database_url="sqlite://", pool=pool,
                            fair_give_way=on)

    ticket = Ticket("req-1", "tag-1", "@tag-1", "govgate:unacked:w", "m", "model.m/t/p:5", "{}", "1 1 0 0 0 0",
                    lambda: None)
    with offering(ticket):
        assert give_way_ticket_of(config(POOL_SOLO, True), "req-1") is ticket
        assert give_way_ticket_of(config(POOL_SOLO, True), "req-2") is None  # another job's delivery
        assert give_way_ticket_of(config(POOL_SOLO, False), "req-1") is None
        assert give_way_ticket_of(config(POOL_PREFORK, True), "req-1") is None
        assert give_way_ticket_of(None, "req-1") is None
    assert give_way_ticket_of(config(POOL_SOLO, True), "req-1") is None  # no delivery under way
