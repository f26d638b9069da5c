"""Log setup for every govgate process: text for people, or one JSON object per line for log shippers.

``GOVGATE_LOG_FORMAT=json`` writes each record as one JSON object: ``time``
(UTC, ISO 8601), ``level``, ``logger``, ``message``, ``request_id`` while an
HTTP request is being served (the id of its ``X-Govgate-Request-Id`` header
and audit entries), any ``extra=`` fields, and ``exception`` with the
traceback. ``text`` (the default) keeps the one-line format people read in
``var/logs/`` under ``govgate up``, with the request id in brackets.

What is logged is decided by the code that logs, which never passes a
prompt or an output (docs/architecture.md, "Processes"); the format only
shapes it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from gateway.observability.context import current_request_id

FORMATS = ("text", "json")

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName",
                                                                          "request_id", "request_part"}


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the HTTP request being served (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            document["request_id"] = request_id
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in document:
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        return json.dumps(document, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with ``[request id]`` after the logger while a request is served."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request_part)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_part = f" [{request_id}]" if request_id else ""
        return super().format(record)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Send every logger's records to stderr in ``log_format`` (replacing handlers set before)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # JSON: warnings (Celery's, the libraries') become records too, instead of raw lines on stderr.
    logging.captureWarnings(log_format == "json")
