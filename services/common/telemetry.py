"""OpenTelemetry set-up: traces and metrics, off unless configured.

Owns the tracer and meter providers of a process. When
`OTEL_EXPORTER_OTLP_ENDPOINT` is set (read by the OTLP exporter itself,
along with the other standard `OTEL_*` variables), spans and metrics are
exported over OTLP/gRPC; otherwise no provider is installed and the
instrumentations cost nothing. Tests pass their own span exporter.
Instrumentations: grpc.aio server and client, asyncpg, Celery, redis.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

logger = logging.getLogger(__name__)

_instrumented: set[str] = set()


def configure(service_name: str, *, exporter: SpanExporter | None = None,
              environ: dict[str, str] | None = None) -> bool:
    """Installs providers and instrumentations; True when tracing is on."""
    env = os.environ if environ is None else environ
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter is None and not endpoint:
        return False
    resource = Resource.create({"service.name": service_name})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    trace.set_tracer_provider(provider)
    instrument()
    logger.info("tracing on", extra={"otlp_endpoint": endpoint or "in-process"})
    return True


def instrument(*names: str) -> None:
    """Turns on the library instrumentations once per process."""
    wanted = names or ("grpc", "asyncpg", "celery", "redis")
    for name in wanted:
        if name in _instrumented:
            continue
        instrumentor = _instrumentor(name)
        if instrumentor is not None:
            instrumentor()
            _instrumented.add(name)


def _instrumentor(name: str) -> Any:
    if name == "grpc":
        from opentelemetry.instrumentation.grpc import (
            GrpcAioInstrumentorClient,
            GrpcAioInstrumentorServer,
            GrpcInstrumentorClient,
        )

        def both() -> None:
            GrpcAioInstrumentorServer().instrument()
            GrpcAioInstrumentorClient().instrument()
            GrpcInstrumentorClient().instrument()

        return both
    if name == "asyncpg":
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        return AsyncPGInstrumentor().instrument
    if name == "celery":
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        return CeleryInstrumentor().instrument
    if name == "redis":
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        return RedisInstrumentor().instrument
    return None
