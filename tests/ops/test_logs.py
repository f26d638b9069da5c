"""Log lines: one JSON object each (or the text line), with the request id while a request is served."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gateway.observability import context
from gateway.observability.logs import JsonFormatter, RequestIdFilter, TextFormatter, configure_logging
from gateway.settings import Settings, SettingsError


@pytest.fixture
def captured():
    """The root logger as ``configure_logging`` leaves it, writing to a buffer; restored afterwards."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    buffers = {}

    def configure(log_format: str) -> io.StringIO:
        configure_logging("INFO", log_format)
        buffers[log_format] = io.StringIO()
        root.handlers[0].setStream(buffers[log_format])
        return buffers[log_format]

    yield configure
    root.handlers[:] = saved
    root.setLevel(level)


def test_json_lines_parse_and_carry_the_request_id_and_extras(captured):
    out = captured("json")
    log = logging.getLogger("govgate.test")
    log.info("outside %s", "any request")
    ctx, token = context.begin()
    try:
        log.warning("inside", extra={"model": "m", "tokens": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        context.end(token)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    outside, inside, failed = lines
    assert outside["message"] == "outside any request" and "request_id" not in outside
    assert {outside["level"], outside["logger"]} == {"INFO", "govgate.test"}
    assert outside["time"].endswith("+00:00")
    assert inside == {"time": inside["time"], "level": "WARNING", "logger": "govgate.test", "message": "inside",
                      "request_id": ctx.request_id, "model": "m", "tokens": 3}
    assert failed["request_id"] == ctx.request_id and "ValueError: boom" in failed["exception"]


def test_text_lines_show_the_request_id_in_brackets(captured):
    out = captured("text")
    log = logging.getLogger("govgate.test")
    ctx, token = context.begin()
    try:
        log.info("inside")
    finally:
        context.end(token)
    log.info("outside")
    inside, outside = out.getvalue().splitlines()
    assert inside.endswith(f"INFO govgate.test [{ctx.request_id}]: inside")
    assert outside.endswith("INFO govgate.test: outside")


def test_a_value_json_cannot_encode_is_written_as_text():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.blob = b"\x00\xff"
    RequestIdFilter().filter(record)
    assert json.loads(JsonFormatter().format(record))["blob"] == "b'\\x00\\xff'"
    assert TextFormatter().format(record).endswith("INFO x: m")


@pytest.mark.parametrize("name, raw", [("LOG_FORMAT", "xml"), ("ACCESS_LOG", "maybe"), ("METRICS_ENABLED", "2"),
                                       ("LOG_LEVEL", "VERBOSE"), ("LOG_LEVEL", "trace")])
def test_bad_settings_are_refused_by_name(name, raw):
    with pytest.raises(SettingsError, match=f"GOVGATE_{name}"):
        Settings.from_env({f"GOVGATE_{name}": raw})


def test_the_log_level_is_one_logging_knows_in_any_case():
    assert Settings.from_env({"GOVGATE_LOG_LEVEL": "info"}).log_level == "INFO"
    assert Settings.from_env({"GOVGATE_LOG_LEVEL": " Debug "}).log_level == "DEBUG"
    with pytest.raises(SettingsError, match="^GOVGATE_LOG_LEVEL='VERBOSE' must be one of: DEBUG, INFO, WARNING, "
                                            "ERROR, CRITICAL$"):
        Settings.from_env({"GOVGATE_LOG_LEVEL": "verbose"})


def test_settings_survive_a_trip_through_the_environment():
    settings = Settings(log_format="json", access_log=True, metrics_enabled=False)
    again = Settings.from_env(settings.to_env())
    assert (again.log_format, again.access_log, again.metrics_enabled) == ("json", True, False)
