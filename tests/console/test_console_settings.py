"""The console's two settings: read from GOVGATE_*, refused when unusable, passed on to child processes."""

from __future__ import annotations

import pytest

from gateway.settings import Settings, SettingsError


def test_defaults_and_values_are_read() -> None:
    assert (Settings.from_env({}).console_idle_timeout_s, Settings.from_env({}).console_secure_cookies) == (900.0, False)
    read = Settings.from_env({"GOVGATE_CONSOLE_IDLE_TIMEOUT_S": "60", "GOVGATE_CONSOLE_SECURE_COOKIES": "true"})
    assert (read.console_idle_timeout_s, read.console_secure_cookies) == (60.0, True)
    assert not Settings.from_env({"GOVGATE_CONSOLE_SECURE_COOKIES": "Off"}).console_secure_cookies


def test_a_child_process_reads_back_the_same() -> None:
    settings = Settings().with_(console_idle_timeout_s=45.0, console_secure_cookies=True)
    again = Settings.from_env(settings.to_env())
    assert (again.console_idle_timeout_s, again.console_secure_cookies) == (45.0, True)


@pytest.mark.parametrize(("name", "value"), [("CONSOLE_IDLE_TIMEOUT_S", "5"), ("CONSOLE_IDLE_TIMEOUT_S", "soon"),
                                             ("CONSOLE_SECURE_COOKIES", "maybe")])
def test_unusable_values_are_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"GOVGATE_{name}"):
        Settings.from_env({f"GOVGATE_{name}": value})
