"""Wires the cost service: pool, store, servicer, gRPC server, shutdown.

Owns the process's asyncpg pool (opened in `serve`, closed after the server
has drained and, in its stop, the store has given back its LISTEN and ledger
connections) and the
background loops that mark overdue budget reservations expired and fold
the ledger's per-session total deltas (see `CostStore.fold_totals`).
The Prometheus metrics (`metrics.CostMetrics`) are served on
`DOCIMPORT_METRICS_PORT` with the gRPC server's lifetime.
`build_server` is what tests call: it takes a ready store and returns the
running server on an ephemeral port when `settings.port` is 0.
"""

from __future__ import annotations

import functools

from docimport.cost.v1 import cost_service_pb2, cost_service_pb2_grpc

from services.common import db
from services.common.grpc_server import RunningServer, serve_until_stopped
from services.common.grpc_server import build_server as build_grpc_server
from services.common.loops import Background, periodically
from services.cost.config import CostSettings
from services.cost.metrics import CostMetrics
from services.cost.servicer import INPUT_RULES, POLICY, CostServicer
from services.cost.store import CostStore

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
        input_rules=INPUT_RULES,
        metrics=metrics,
        on_stop=[store.close],  # the ledger's held connection and the LISTEN one go back
    )


async def expire_reservations(store: CostStore) -> None:
    """Marks every overdue reservation expired (the store does a batch a call)."""
    while await store.expire_reservations() > 0:
        pass


async def serve(settings: CostSettings) -> None:
    pool = await db.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
    )
    store = CostStore(pool)
    await store.ensure_default_price_book(settings.price_book_file, settings.cpu_second_rate)
    running = await build_server(settings, store=store)
    loops = []
    for interval, action, what in (
        (settings.expiry_sweep_interval, lambda: expire_reservations(store),
         "reservation expiry sweep"),
        (settings.totals_fold_interval, store.fold_totals, "folding ledger totals"),
    ):
        if interval > 0:
            loop = Background(what)
            loop.start(functools.partial(periodically, interval, action, what))
            loops.append(loop)

    async def stop_loops() -> None:
        for loop in loops:
            await loop.stop()

    await serve_until_stopped(running, settings, cleanup=[stop_loops, pool.close])
