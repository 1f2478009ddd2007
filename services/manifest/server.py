"""Wires the manifest service: pool, scanner, cost channel, servicer, gRPC server.

Owns the process's resources and closes them in order on shutdown: the
gRPC server drains, running scans are cancelled (their manifests stay
`scanning` and the next retry of the same request scans again), then the
scanner's reader processes, the channel to the cost service and the asyncpg pool
are closed. `build_server` is what tests call: it takes a ready store and
optionally a scanner and a cost stub, and returns the running server on an
ephemeral port when `settings.port` is 0 (`ManifestServer.close` releases
what it created).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2, manifest_service_pb2_grpc

from services.common import db
from services.common.channels import aio_channel
from services.common.grpc_server import RunningServer, build_server as build_grpc_server
from services.common.grpc_server import serve_until_stopped
from services.manifest import classify
from services.manifest.analyzer import Analyzer, ImportAnalyzer
from services.manifest.config import ManifestSettings
from services.manifest.metrics import ManifestMetrics
from services.manifest.pricing import Pricer
from services.manifest.scanner import Scanner
from services.manifest.servicer import POLICY, ManifestServicer
from services.manifest.store import ManifestStore

SERVICE_NAME = manifest_service_pb2.DESCRIPTOR.services_by_name["ManifestService"].full_name


def make_scanner(settings: ManifestSettings) -> Scanner:
    read_as = None
    if settings.scan_uid is not None:
        read_as = (settings.scan_uid, settings.scan_gid if settings.scan_gid is not None else settings.scan_uid)
    return Scanner(
        settings.scan_workers,
        max_file_bytes=settings.max_file_bytes,
        categorizer=classify.Categorizer(settings.categories, settings.category_priorities),
        read_as=read_as,
    )


@dataclass
class ManifestServer:
    """The running server and what `build_server` made for it."""

    running: RunningServer
    analyzer: Analyzer
    scanner: Scanner
    owned_scanner: bool
    channel: grpc.aio.Channel | None = None
    _closed: bool = field(default=False, repr=False)

    @property
    def port(self) -> int:
        return self.running.port

    async def close(self, grace: float | None = None) -> None:
        """Stops the server, cancels scans, closes the scanner (if made here) and the channel."""
        if self._closed:
            return
        self._closed = True
        await self.running.stop(grace)
        await self.analyzer.close()
        if self.owned_scanner:
            self.scanner.close()
        if self.channel is not None:
            await self.channel.close()


async def build_server(
    settings: ManifestSettings,
    *,
    store: ManifestStore,
    scanner: Scanner | None = None,
    cost_stub: cost_service_pb2_grpc.CostServiceStub | None = None,
) -> ManifestServer:
    """Starts the service. Without `cost_stub`, a channel to settings.cost_addr is opened."""
    owned = scanner is None
    scanner = scanner or make_scanner(settings)
    channel = None
    if cost_stub is None and settings.cost_addr:
        channel = aio_channel(settings.cost_addr, settings)
        cost_stub = cost_service_pb2_grpc.CostServiceStub(channel)
    metrics = ManifestMetrics()
    analyzer = Analyzer(store, scanner, Pricer(cost_stub, settings.rpc_timeout),
                        max_concurrent=settings.max_concurrent_scans, metrics=metrics)
    importer = ImportAnalyzer(store, analyzer, scanner.categorizer)
    servicer = ManifestServicer(store, analyzer, importer, settings)
    running = await build_grpc_server(
        settings,
        register=lambda server: manifest_service_pb2_grpc.add_ManifestServiceServicer_to_server(servicer, server),
        service_names=[SERVICE_NAME],
        policy=POLICY,
        metrics=metrics,
    )
    return ManifestServer(running, analyzer, scanner, owned, channel)


async def serve(settings: ManifestSettings) -> None:
    pool = await db.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
    )
    scanner = make_scanner(settings)
    scanner.start()
    server = await build_server(settings, store=ManifestStore(pool), scanner=scanner)

    async def close_rest() -> None:
        await server.analyzer.close()
        scanner.close()
        if server.channel is not None:
            await server.channel.close()

    await serve_until_stopped(server.running, settings, cleanup=[close_rest, pool.close])
