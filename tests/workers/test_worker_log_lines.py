"""The worker's log at INFO: one line per job (Celery's success line), its "received" line only at DEBUG.

The served path (a real worker's log file, the success line there, no
received line) is checked in tests/e2e/test_privacy_leaks.py.
"""

from __future__ import annotations

import logging

import pytest

from workers.runtime import one_line_per_job

RECEIVED_LOGGER = "celery.worker.strategy"


@pytest.fixture
def received_logger():
    logger, root = logging.getLogger(RECEIVED_LOGGER), logging.getLogger()
    levels = logger.level, root.level
    logger.setLevel(logging.NOTSET)
    yield logger
    logger.setLevel(levels[0])
    root.setLevel(levels[1])


@pytest.mark.parametrize("loglevel", ["INFO", "info", "WARNING", "ERROR"])
def test_above_debug_the_received_line_is_not_written(received_logger, loglevel):
    logging.getLogger().setLevel(logging.DEBUG)  # whatever the root says, the line's own logger decides
    one_line_per_job(loglevel)
    assert not received_logger.isEnabledFor(logging.INFO)
    assert received_logger.isEnabledFor(logging.WARNING)  # its warnings and errors still show


def test_at_debug_it_stays(received_logger):
    logging.getLogger().setLevel(logging.DEBUG)
    one_line_per_job("DEBUG")
    assert received_logger.isEnabledFor(logging.INFO)
