"""Wires the cost service: pool, store, servicer, gRPC server, shutdown.

Owns the process's asyncpg pool (opened in `serve`, closed after the server
has drained). `build_server` is what tests call: it takes a ready store and
returns the running server on an ephemeral port when `settings.port` is 0.
"""

from __future__ import annotations

from docimport.cost.v1 import cost_service_pb2, cost_service_pb2_grpc

from services.common import db
from services.common.grpc_server import RunningServer, build_server as build_grpc_server
from services.common.grpc_server import serve_until_stopped, start_metrics_server
from services.cost.config import CostSettings
from services.cost.servicer import POLICY, CostServicer
from services.cost.store import CostStore

SERVICE_NAME = cost_service_pb2.DESCRIPTOR.services_by_name["CostService"].full_name


async def build_server(settings: CostSettings, *, store: CostStore) -> RunningServer:
    servicer = CostServicer(store, settings)
    return await build_grpc_server(
        settings,
        register=lambda server: cost_service_pb2_grpc.add_CostServiceServicer_to_server(servicer, server),
        service_names=[SERVICE_NAME],
        policy=POLICY,
    )


async def serve(settings: CostSettings) -> None:
    pool = await db.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
    )
    store = CostStore(pool)
    await store.ensure_default_price_book(settings.price_book_file, settings.cpu_second_rate)
    running = await build_server(settings, store=store)
    start_metrics_server(settings.metrics_port)
    await serve_until_stopped(running, settings, cleanup=[pool.close])
