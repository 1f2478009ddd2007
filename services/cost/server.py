"""Wires the cost service: pool, store, servicer, gRPC server, shutdown.

Owns the process's asyncpg pool (opened in `serve`, closed after the server
has drained and, in its stop, the store has given back its LISTEN and ledger
connections) and the
background sweep that marks overdue budget reservations expired.
The Prometheus metrics (`metrics.CostMetrics`) are served on
`DOCIMPORT_METRICS_PORT` with the gRPC server's lifetime.
`build_server` is what tests call: it takes a ready store and returns the
running server on an ephemeral port when `settings.port` is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from docimport.cost.v1 import cost_service_pb2, cost_service_pb2_grpc

from services.common import db
from services.common.grpc_server import RunningServer, serve_until_stopped
from services.common.grpc_server import build_server as build_grpc_server
from services.cost.config import CostSettings
from services.cost.metrics import CostMetrics
from services.cost.servicer import POLICY, CostServicer
from services.cost.store import CostStore

logger = logging.getLogger(__name__)

SERVICE_NAME = cost_service_pb2.DESCRIPTOR.services_by_name["CostService"].full_name


async def build_server(settings: CostSettings, *, store: CostStore) -> RunningServer:
    metrics = CostMetrics()
    metrics.watch_budgets(store, window=settings.metrics_budget_window)
    servicer = CostServicer(store, settings, metrics)
    return await build_grpc_server(
        settings,
        register=lambda server: cost_service_pb2_grpc.add_CostServiceServicer_to_server(servicer, server),
        service_names=[SERVICE_NAME],
        policy=POLICY,
        metrics=metrics,
        on_stop=[store.close],  # the ledger's held connection and the LISTEN one go back
    )


async def sweep_expired(store: CostStore, interval: float) -> None:
    """Marks overdue reservations expired every `interval` seconds, until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            while await store.expire_reservations() > 0:
                pass
        except Exception:  # noqa: BLE001 - a failed sweep is retried on the next tick
            logger.warning("reservation expiry sweep failed", exc_info=True)


async def serve(settings: CostSettings) -> None:
    pool = await db.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
    )
    store = CostStore(pool)
    await store.ensure_default_price_book(settings.price_book_file, settings.cpu_second_rate)
    running = await build_server(settings, store=store)
    sweeper = None
    if settings.expiry_sweep_interval > 0:
        sweeper = asyncio.create_task(sweep_expired(store, settings.expiry_sweep_interval))

    async def stop_sweeper() -> None:
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    await serve_until_stopped(running, settings, cleanup=[stop_sweeper, pool.close])
