"""JSON logs, one line per event, carrying the trace id and request context.

Owns the single logging configuration of every process (`configure`).
Modules log with `logging.getLogger(__name__)` and `%` arguments, adding
fields through `extra=`; the session id, document id and request id of the
call being served come from context variables set with `bind()`, and the
trace and span ids from the current OpenTelemetry span.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("log_context", default={})

_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName"}
)


@contextlib.contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Adds fields (session_id=..., document_id=...) to every log line inside."""
    token = push(**fields)
    try:
        yield
    finally:
        pop(token)


def push(**fields: str | None) -> contextvars.Token[dict[str, str]]:
    """`bind` for callbacks that start and end apart (Celery's prerun/postrun)."""
    return _context.set({**_context.get(), **{k: str(v) for k, v in fields.items() if v}})


def pop(token: contextvars.Token[dict[str, str]]) -> None:
    """Ends what `push` began (in the same thread and context)."""
    _context.reset(token)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object per line."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "severity": record.levelname,
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        entry.update(_context.get())
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(component: str, level: str = "INFO", *, stream: Any = None) -> None:
    """Sends every log record of the process to stderr (or `stream`) as JSON."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("grpc", "asyncio", "urllib3", "botocore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
