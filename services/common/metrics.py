"""Prometheus metrics shared by every docimport process: registry, RPC metrics, /metrics.

Owns what is the same in every service: `ServiceMetrics` (one
`CollectorRegistry` per server, with the process collectors and the RPC
latency histogram), `RpcRecorder` (what the one server interceptor,
`services.common.interceptor`, records of every RPC: duration and status
code), `DatabaseCollector` (metric
families read from Postgres on each scrape), `watching` (a gauge held up
while a stream is open), and `MetricsHTTPServer` (the `/metrics` port,
started and stopped with the gRPC server by `grpc_server.build_server`).
Each service adds its own metrics in its own `metrics.py` by extending
`ServiceMetrics`; the worker's are in `services/worker/metrics.py`.

Decisions:

- A registry per server, not prometheus_client's global REGISTRY: tests run
  three services in one process and scrape each over its own port, and one
  process in production runs one service anyway.
- Hot paths never create label children per call: metrics with a small
  closed label set (stage, outcome) are bound once into dicts or attributes;
  the RPC recorder caches its child per (method, code) on first use.
- Values Postgres already holds (documents by state, budgets) are read on
  scrape by a `DatabaseCollector`, never mirrored in memory: they are then
  correct after a restart and identical on every replica. With several
  replicas each exports the same values, so dashboards aggregate them with
  `max`, never `sum`. The scrape thread runs the query on the service's
  event loop (`run_coroutine_threadsafe`) with a timeout; a failed read
  skips those families and counts `docimport_metrics_collect_errors_total`.
- Money is Decimal everywhere else; it becomes float only here, in a sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services.common.errors import status_code

logger = logging.getLogger(__name__)

# RPC latency buckets, seconds: sub-millisecond ingest up to long unary calls.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
               10.0, 30.0, 60.0)
# Stage durations, seconds: cache hits in milliseconds up to hour-long OCR.
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                 300.0, 600.0, 1800.0, 3600.0)


def new_registry(*, process: bool = True) -> CollectorRegistry:
    """A fresh registry, with the process, platform and GC collectors when `process`."""
    registry = CollectorRegistry()
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class ServiceMetrics:
    """A service's registry and the metrics every service has."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        self.rpc_duration = Histogram(
            "docimport_rpc_duration_seconds",
            "Server-side duration of RPCs (streams: until the stream ends), by method and status code.",
            ["service", "method", "type", "code"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self.collect_errors = Counter(
            "docimport_metrics_collect_errors_total",
            "Scrapes in which a collector could not read its values (they were left out).",
            ["collector"],
            registry=self.registry,
        )
        self.watchers = Gauge(
            "docimport_watchers",
            "Progress streams open now, by RPC.",
            ["stream"],
            registry=self.registry,
        )

    def rpc_recorder(self) -> RpcRecorder:
        return RpcRecorder(self.rpc_duration)

    def add_database_collector(
        self,
        name: str,
        read: Callable[[], Awaitable[Iterable[Metric]]],
        describe: Sequence[Metric],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = 5.0,
    ) -> DatabaseCollector:
        """Registers families that `read` computes on the running loop at each scrape."""
        collector = DatabaseCollector(
            name,
            read,
            describe,
            loop=loop or asyncio.get_running_loop(),
            timeout=timeout,
            errors=self.collect_errors.labels(name),
        )
        self.registry.register(collector)
        return collector


# ------------------------------------------------------------------ RPC metrics


def _split_method(full: str) -> tuple[str, str]:
    """`/pkg.Service/Method` -> (`pkg.Service`, `Method`)."""
    _, _, rest = full.partition("/")
    service, _, method = rest.rpartition("/")
    return service, method


class RpcRecorder:
    """Records each RPC's duration and final status code (used by the one server interceptor).

    A stream's duration is its whole life (for watch streams: how long a
    watcher stayed). The interceptor is the outermost layer, so the code
    recorded is the one the caller gets, refusals by auth included.
    """

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._children: dict[tuple[str, str], Any] = {}

    def _child(self, method: str, kind: str, code: grpc.StatusCode) -> Any:
        key = (method, code.name)
        child = self._children.get(key)
        if child is None:
            service, name = _split_method(method)
            child = self._histogram.labels(service, name, kind, code.name)
            self._children[key] = child
        return child

    @staticmethod
    def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        if isinstance(code, int):  # some grpcio versions keep the raw integer
            return status_code(code)
        if exc is not None and not isinstance(exc, grpc.aio.AbortError):
            return grpc.StatusCode.UNKNOWN
        return grpc.StatusCode.OK

    def observe(
        self,
        method: str,
        kind: str,
        context: grpc.aio.ServicerContext,
        failure: BaseException | None,
        seconds: float,
    ) -> None:
        self._child(method, kind, self._code(context, failure)).observe(seconds)


@contextlib.contextmanager
def watching(gauge_child: Any) -> Iterator[None]:
    """Holds `gauge_child` one higher while the block runs (an open stream)."""
    gauge_child.inc()
    try:
        yield
    finally:
        gauge_child.dec()


# ------------------------------------------------------------ scrape-time reads


class DatabaseCollector(Collector):
    """Metric families computed by a coroutine on the service's loop, at each scrape.

    `describe` lists the families (without samples) so the registry knows
    their names without querying. Scrapes arrive on the HTTP server's
    thread; a scrape made from the loop's own thread would deadlock and
    yields nothing instead.
    """

    def __init__(
        self,
        name: str,
        read: Callable[[], Awaitable[Iterable[Metric]]],
        describe: Sequence[Metric],
        *,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        errors: Any,
    ) -> None:
        self.name = name
        self._read = read
        self._describe = list(describe)
        self._loop = loop
        self._timeout = timeout
        self._errors = errors

    def describe(self) -> Iterable[Metric]:
        return self._describe

    def collect(self) -> Iterable[Metric]:
        if self._loop.is_closed():
            return []
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            logger.warning("metrics collector %s called on its own loop; skipped", self.name)
            return []
        future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)  # type: ignore[arg-type]
        try:
            return list(future.result(self._timeout))
        except Exception:  # noqa: BLE001 - a scrape must not fail because one source did
            future.cancel()
            self._errors.inc()
            logger.warning("metrics collector %s failed", self.name, exc_info=True)
            return []


def family(kind: str, name: str, documentation: str, labels: Sequence[str] = ()) -> Any:
    """An empty GaugeMetricFamily/CounterMetricFamily, for `describe` and for filling."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}[kind]
    return cls(name, documentation, labels=list(labels))


# ------------------------------------------------------------------- HTTP port


class MetricsHTTPServer:
    """The `/metrics` HTTP endpoint of one registry, on its own thread."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_address[1]
        self._lock = threading.Lock()
        self._stopped = False
        self.host: str = self._server.server_address[0]
        logger.info("metrics on %s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, port: int, host: str) -> MetricsHTTPServer | None:
    """Serves `registry` on `host`:`port` (0 = off); `host` is `MetricsSettings.metrics_host`."""
    if not port:
        return None
    return MetricsHTTPServer(registry, port, host)
