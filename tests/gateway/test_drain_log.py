"""The drain's cut names the time it really ran (a second Ctrl-C cuts it short of GOVGATE_DRAIN_S)."""

from __future__ import annotations

import logging

from gateway.drain import Drain


def test_the_cut_says_how_long_the_drain_ran_not_its_setting(caplog) -> None:
    drain = Drain(20.0)
    ended: list[bool] = []
    drain.begin()
    leave = drain.enter(lambda: ended.append(True))
    with caplog.at_level(logging.WARNING, logger="gateway.drain"):
        drain.cut()  # at once, as a forced stop cuts it
    leave()
    assert ended == [True]
    assert "1 requests still in flight after 0.0s" in caplog.text and "after 20s" not in caplog.text
