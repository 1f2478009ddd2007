"""OpenTelemetry set-up and the trace context carried across docimport's hops.

Owns the tracer and meter providers of a process. When
`OTEL_EXPORTER_OTLP_ENDPOINT` is set (read by the OTLP exporter itself,
along with the other standard `OTEL_*` variables), spans and metrics are
exported over OTLP/gRPC; otherwise nothing is installed, `enabled()` is
False, and every helper here returns at once (no span objects, no header
work: the session service's hot paths pay one boolean test). Tests pass
their own span exporter. Instrumentations: grpc (aio server and client,
blocking client), asyncpg, Celery, redis.

How one trace follows a document stage, since the work is asynchronous:

1. The CLI command is a span (`command_span`); its gRPC calls carry it
   (W3C `traceparent` in the metadata, by the grpc instrumentation).
2. The session service stores the `traceparent` of the call that started
   the work (CreateSession with start, StartSession, ResumeSession,
   RetryDocuments: `current_traceparent()`) on the session.
3. The dispatcher publishes each stage run inside a PRODUCER span that is a
   child of that stored context (`publish_span`) and writes the span's
   context into the Celery message headers. The session service publishes
   with kombu directly (batched), so Celery's own publish hook never runs:
   the headers are set here.
4. The worker's Celery instrumentation continues that context from the
   message headers (the task span), and the worker's blocking gRPC calls
   (ReportStageStarted, RecordCosts, ReportStageResult) carry it on to the
   cost and session services.

So the trace of the operator's command holds one subtree per document stage,
rooted at its publish span (attributes `docimport.session_id`,
`docimport.document_id`, `docimport.stage`). A session started by one
command of 100,000 documents makes one large trace; sample it with the
standard `OTEL_TRACES_SAMPLER` variables (the default parent-based sampler
follows the CLI's decision).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

logger = logging.getLogger(__name__)

TRACER = "docimport"

_instrumented: dict[str, Any] = {}
_enabled = False
_provider: TracerProvider | None = None


def enabled() -> bool:
    """True once `configure` turned tracing on in this process."""
    return _enabled


def configure(service_name: str, *, exporter: SpanExporter | None = None,
              environ: Mapping[str, str] | None = None) -> bool:
    """Installs providers and instrumentations; True when tracing is on.

    Called once per process (a test may call it again with another exporter:
    the processor is added to the provider already installed).
    """
    global _enabled, _provider
    env = os.environ if environ is None else environ
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter is None and not endpoint:
        return False
    if _provider is None:
        resource = Resource.create({"service.name": service_name})
        _provider = TracerProvider(resource=resource)
        trace.set_tracer_provider(_provider)
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            reader = PeriodicExportingMetricReader(OTLPMetricExporter())
            metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    if exporter is not None:
        _provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    instrument()
    _enabled = True
    logger.info("tracing on", extra={"otlp_endpoint": endpoint or "in-process"})
    return True


def disable() -> None:
    """Turns tracing off again: removes the instrumentations (tests end with this).

    The provider stays installed (OpenTelemetry sets it once per process) but
    nothing creates spans any more.
    """
    global _enabled
    _enabled = False
    for name in list(_instrumented):
        for instrumentor in _instrumented.pop(name):
            instrumentor.uninstrument()
    if _provider is not None:
        _provider.force_flush()


def instrument(*names: str) -> None:
    """Turns on the library instrumentations once per process."""
    wanted = names or ("grpc", "asyncpg", "celery", "redis")
    for name in wanted:
        if name in _instrumented:
            continue
        instrumentors = _instrumentors(name)
        for instrumentor in instrumentors:
            instrumentor.instrument()
        _instrumented[name] = instrumentors


def _instrumentors(name: str) -> list[Any]:
    if name == "grpc":
        from opentelemetry.instrumentation.grpc import (
            GrpcAioInstrumentorClient,
            GrpcAioInstrumentorServer,
            GrpcInstrumentorClient,
        )

        return [GrpcAioInstrumentorServer(), GrpcAioInstrumentorClient(), GrpcInstrumentorClient()]
    if name == "asyncpg":
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        return [AsyncPGInstrumentor()]
    if name == "celery":
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        return [CeleryInstrumentor()]
    if name == "redis":
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        return [RedisInstrumentor()]
    raise ValueError(f"no instrumentation named {name!r}")


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER)


@contextlib.contextmanager
def command_span(name: str, **attributes: str) -> Iterator[None]:
    """A span around a CLI command (the root of its trace); nothing when off."""
    if not _enabled:
        yield
        return
    with tracer().start_as_current_span(name, kind=trace.SpanKind.CLIENT,
                                        attributes=_attrs(attributes)):
        yield


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span (the RPC being served), or None."""
    if not _enabled:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def publish_span(name: str, parent: str | None, attributes: Mapping[str, Any]) -> Any:
    """A started PRODUCER span, child of `parent` (a traceparent); None when off.

    The caller writes `headers_of(span)` into the message and ends the span
    once the message is published.
    """
    if not _enabled:
        return None
    context = propagate.extract({"traceparent": parent}) if parent else None
    return tracer().start_span(
        name, context=context, kind=trace.SpanKind.PRODUCER, attributes=_attrs(attributes)
    )


def headers_of(span: Any) -> dict[str, str]:
    """The propagation headers (traceparent, tracestate) naming `span` as parent."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def failed(span: Any, exc: BaseException) -> None:
    """Marks a span failed by `exc`."""
    span.record_exception(exc)
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _attrs(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {
        (k if "." in k else f"docimport.{k}"): v for k, v in attributes.items() if v is not None
    }
