"""JSON log lines carry the trace id and bound context."""

from __future__ import annotations

import io
import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from services.common import logging as jsonlog


def test_a_log_line_is_json_with_trace_and_context():
    stream = io.StringIO()
    jsonlog.configure("test", "INFO", stream=stream)
    tracer = TracerProvider().get_tracer("t")
    try:
        with tracer.start_as_current_span("work") as span, jsonlog.bind(session_id="s-1", document_id="d-1"):
            logging.getLogger("x").info("stage %s done", "extract", extra={"attempt": 2})
            trace_id = format(span.get_span_context().trace_id, "032x")
        logging.getLogger("x").warning("outside")
    finally:
        logging.getLogger().handlers.clear()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "stage extract done"
    assert first["trace_id"] == trace_id
    assert (first["session_id"], first["document_id"], first["attempt"]) == ("s-1", "d-1", 2)
    assert first["severity"] == "INFO" and first["component"] == "test"
    assert "session_id" not in second and "trace_id" not in second
