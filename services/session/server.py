"""Wires the session service: pool, channels, store, dispatcher, reconciler, server.

`serve()` owns, opens and closes everything of the process: the asyncpg
pool, the channels to the manifest and cost services, the Celery
publisher and broker probe, the event hub's LISTEN connection, and the
dispatcher, lease keeper and reconciler tasks. On SIGTERM: health NOT_SERVING, in-flight calls drain
(watch streams end), the background tasks stop, then the hub, the
publisher, the channels and the pool close, in that order.

The Prometheus metrics (`metrics.SessionMetrics`) are made here and
served on `DOCIMPORT_METRICS_PORT` with the gRPC server's lifetime.

`build_server` is what tests call: it takes a ready store, Enqueuer, broker
probe, run tracker and peer stubs (the caller owns them; without a probe the pipeline
overview reports the broker as not configured; without a tracker one is made
on the broker and closed with the server) and returns the running
server on an ephemeral port when `settings.port` is 0; with `background=False` the
dispatcher, lease keeper and reconciler do not loop, and tests drive
`run_once()` (leases then run out by time alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2_grpc

from services.common import db
from services.common.channels import aio_channel
from services.common.grpc_server import RunningServer, serve_until_stopped
from services.common.grpc_server import build_server as build_grpc_server
from services.session.config import SessionSettings
from services.session.dispatcher import Dispatcher
from services.session.events import EventHub
from services.session.leases import LeaseKeeper
from services.session.metrics import SessionMetrics
from services.session.peers import CostPeer, ManifestPeer
from services.session.queue import (
    BrokerProbe,
    CeleryEnqueuer,
    CeleryProbe,
    CeleryRunTracker,
    Enqueuer,
    QueueDepths,
    RunTracker,
)
from services.session.reconciler import Reconciler
from services.session.servicer import INPUT_RULES, POLICY, SERVICE_NAME, SessionServicer
from services.session.store import SessionStore


@dataclass
class SessionServer(RunningServer):
    """The running gRPC server plus the session service's own machinery."""

    servicer: SessionServicer | None = None
    dispatcher: Dispatcher | None = None
    reconciler: Reconciler | None = None
    keeper: LeaseKeeper | None = None
    hub: EventHub | None = None
    queue_depths: QueueDepths | None = None
    tracker: RunTracker | None = None  # closed here when build_server made it

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING, then the background loops end, then the base stop: calls
        drain, `on_stop` (the servicer's held connections, the event hub) and metrics."""
        await self.health.enter_graceful_shutdown()  # first; the base stop's call is then a no-op
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.reconciler is not None:
            await self.reconciler.stop()
        if self.keeper is not None:
            await self.keeper.stop()
        await super().stop(grace)
        if self.queue_depths is not None:
            self.queue_depths.close()
        if self.tracker is not None:
            await self.tracker.close()


async def build_server(
    settings: SessionSettings,
    *,
    store: SessionStore,
    enqueuer: Enqueuer,
    manifest_stub: Any = None,
    cost_stub: Any = None,
    probe: BrokerProbe | None = None,
    tracker: RunTracker | None = None,
    background: bool = True,
) -> SessionServer:
    timeout = settings.dependency_timeout
    manifest = ManifestPeer(manifest_stub, timeout) if manifest_stub is not None else None
    cost = CostPeer(cost_stub, timeout) if cost_stub is not None else None
    metrics = SessionMetrics()
    metrics.watch_database(store, stall_after=settings.stall_after)
    queue_depths = QueueDepths(settings.broker_url)
    metrics.watch_queues(queue_depths.read)
    dispatcher = Dispatcher(store, enqueuer, settings, cost, metrics)
    own_tracker = None
    if tracker is None and background:
        tracker = own_tracker = CeleryRunTracker(settings.broker_url, timeout=settings.probe_timeout)
    # Without a tracker (tests driving the loops by hand) leases run out by time alone.
    keeper = LeaseKeeper(store, tracker, settings)
    reconciler = Reconciler(store, dispatcher, settings, cost, keeper)
    hub = EventHub(
        settings.database_url.get_secret_value(),
        store,
        capacity=settings.watch_buffer,
        on_foreign_change=lambda _session_id: dispatcher.wake(),
    )
    await hub.start()
    servicer = SessionServicer(
        store, settings, dispatcher, hub, manifest, cost, metrics, probe, keeper
    )
    running = await build_grpc_server(
        settings,
        register=lambda server: session_service_pb2_grpc.add_SessionServiceServicer_to_server(
            servicer, server
        ),
        service_names=[SERVICE_NAME],
        policy=POLICY,
        input_rules=INPUT_RULES,
        metrics=metrics,
        on_stop=[servicer.close, hub.stop],
    )
    if background:
        dispatcher.start()
        keeper.start()
        reconciler.start()
    return SessionServer(
        running.server,
        running.port,
        running.health,
        running.service_names,
        running.metrics,
        running.metrics_http,
        running.on_stop,
        servicer=servicer,
        dispatcher=dispatcher,
        reconciler=reconciler,
        keeper=keeper,
        hub=hub,
        queue_depths=queue_depths,
        tracker=own_tracker,
    )


async def serve(settings: SessionSettings) -> None:
    pool = await db.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
    )
    manifest_channel = aio_channel(settings.manifest_addr, settings)
    cost_channel = aio_channel(settings.cost_addr, settings)
    enqueuer = CeleryEnqueuer(settings.broker_url, batch_size=settings.publish_batch)
    probe = CeleryProbe(
        settings.broker_url,
        ping_timeout=settings.worker_ping_timeout,
        workers_ttl=settings.worker_cache_seconds,
    )
    running = await build_server(
        settings,
        store=SessionStore(pool),
        enqueuer=enqueuer,
        manifest_stub=manifest_service_pb2_grpc.ManifestServiceStub(manifest_channel),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
        probe=probe,
    )
    await serve_until_stopped(
        running,
        settings,
        cleanup=[
            enqueuer.close,
            probe.close,
            manifest_channel.close,
            cost_channel.close,
            pool.close,
        ],
    )
