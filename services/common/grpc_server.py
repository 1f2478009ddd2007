"""The grpc.aio server bootstrap every service uses.

Owns what is the same in every service: binding (TLS when a certificate is
configured), the one platform interceptor (metrics, auth, decoding and the
generic input checks, error mapping; OpenTelemetry's own server interceptor
when tracing is on), the standard health service,
server reflection, the Prometheus `/metrics` HTTP port of the service's
registry (`DOCIMPORT_METRICS_PORT`, started and stopped with the server; see
`services.common.metrics`), and the graceful
shutdown on SIGTERM/SIGINT: health turns NOT_SERVING, in-flight calls get
`shutdown_grace` seconds, then the caller's cleanup (closing the pool) runs.

A service's `server.py` calls `build_server` with its servicers, its
scope policy and its exceptions to the generic input rules
(`validate.Rules`), and `serve_until_stopped` from its `serve()`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import Authenticator, Scope
from services.common.config import ServiceSettings, describe_invalid
from services.common.interceptor import PlatformInterceptor
from services.common.metrics import MetricsHTTPServer, ServiceMetrics, serve_metrics
from services.common.validate import RequestValidator, Rules

logger = logging.getLogger(__name__)


@dataclass
class RunningServer:
    """A started server, its bound port and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    metrics: ServiceMetrics | None = None
    metrics_http: MetricsHTTPServer | None = None
    # Run after the server stopped (calls drained): give back what the handlers held.
    on_stop: tuple[Callable[[], Awaitable[object]], ...] = ()

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.port if self.metrics_http is not None else None

    def stop_metrics(self) -> None:
        if self.metrics_http is not None:
            self.metrics_http.stop()

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for step in self.on_stop:
            await step()
        self.stop_metrics()


async def build_server(
    settings: ServiceSettings,
    *,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    policy: Mapping[str, Iterable[Scope]],
    metrics: ServiceMetrics | None = None,
    on_stop: Sequence[Callable[[], Awaitable[object]]] = (),
    input_rules: Rules | None = None,
) -> RunningServer:
    """Builds, binds and starts a server; every named service is SERVING.

    `metrics` is the service's registry (a bare `ServiceMetrics` when None);
    every call goes through `interceptor.PlatformInterceptor` (metrics, auth,
    decoding and input checks under `input_rules`, error mapping), so what
    it records is the code a caller gets.
    """
    metrics = metrics if metrics is not None else ServiceMetrics()
    interceptors = [
        PlatformInterceptor(
            Authenticator(settings.token_scopes(), policy),
            metrics.rpc_recorder(),
            RequestValidator(input_rules),
        )
    ]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{settings.host}:{settings.port}"
    tls = settings.tls
    if tls.cert_file and tls.key_file:
        credentials = grpc.ssl_server_credentials(
            [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("gRPC server listening", extra={"port": port, "services": list(service_names)})
    try:
        metrics_http = serve_metrics(metrics.registry, settings.metrics_port, settings.metrics_host)
    except OSError:
        await server.stop(None)
        raise
    return RunningServer(
        server, port, health_servicer, tuple(service_names), metrics, metrics_http, tuple(on_stop)
    )


async def serve_until_stopped(
    running: RunningServer,
    settings: ServiceSettings,
    *,
    cleanup: Sequence[Callable[[], Awaitable[object]]] = (),
    stop_event: asyncio.Event | None = None,
) -> None:
    """Runs until SIGTERM/SIGINT (or `stop_event`), then shuts down gracefully."""
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    await stop.wait()
    logger.info("shutting down; draining calls for up to %.1fs", settings.shutdown_grace)
    await running.stop(settings.shutdown_grace)
    for step in cleanup:
        try:
            await step()
        except Exception:  # noqa: BLE001 - cleanup must go on
            logger.exception("cleanup step failed")
    logger.info("stopped")


def run_main(
    component: str,
    settings_factory: Callable[[], ServiceSettings],
    serve: Callable[[ServiceSettings], Awaitable[None]],
) -> int:
    """The body of every service's `__main__`: settings, logs, tracing, serve.

    A missing or malformed variable exits with status 2 and a message naming it.
    """
    import sys

    from pydantic import ValidationError

    from services.common import logging as jsonlog
    from services.common import telemetry

    try:
        settings = settings_factory()
    except ValidationError as exc:
        print(f"docimport-{component}: bad configuration: {describe_invalid(exc)}", file=sys.stderr)
        return 2
    jsonlog.configure(component, settings.log_level)
    telemetry.configure(f"docimport-{component}")
    asyncio.run(serve(settings))
    return 0
