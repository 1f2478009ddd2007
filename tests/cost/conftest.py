"""Fixtures of the cost service tests: a real server on a fresh database.

`cost` starts `services.cost.server.build_server` in-process on an
ephemeral port over this test's own migrated database, with the default
price book loaded as version 1, and gives stubs for each token scope.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import asyncpg
import grpc
import pytest
from conftest import TOKENS
from docimport.cost.v1 import cost_service_pb2_grpc

from services.common.channels import aio_channel
from services.common.config import ClientSettings
from services.cost.config import CostSettings
from services.cost.server import build_server
from services.cost.store import CostStore

CPU_RATE = Decimal("0.00002")


@dataclass
class CostHarness:
    port: int
    store: CostStore
    pool: asyncpg.Pool
    settings: CostSettings
    stubs: dict[str, cost_service_pb2_grpc.CostServiceStub]
    channels: list[grpc.aio.Channel]

    @property
    def service(self) -> cost_service_pb2_grpc.CostServiceStub:
        return self.stubs["service"]

    @property
    def operator(self) -> cost_service_pb2_grpc.CostServiceStub:
        return self.stubs["operator"]

    @property
    def worker(self) -> cost_service_pb2_grpc.CostServiceStub:
        return self.stubs["worker"]

    def stub(self, token: str) -> cost_service_pb2_grpc.CostServiceStub:
        channel = aio_channel(f"127.0.0.1:{self.port}", ClientSettings(), token=token)
        self.channels.append(channel)
        return cost_service_pb2_grpc.CostServiceStub(channel)


@pytest.fixture
def cost_settings(db_url: str, token_env: dict[str, object]) -> CostSettings:
    return CostSettings(
        database_url=db_url,
        cpu_second_rate=CPU_RATE,
        watch_poll_interval=2.0,
        watch_min_interval=0.02,
        **token_env,
    )


@pytest.fixture
async def cost(cost_settings: CostSettings, pool: asyncpg.Pool) -> AsyncIterator[CostHarness]:
    store = CostStore(pool)
    await store.ensure_default_price_book(cost_settings.price_book_file, cost_settings.cpu_second_rate)
    running = await build_server(cost_settings, store=store)
    harness = CostHarness(running.port, store, pool, cost_settings, {}, [])
    for scope, token in TOKENS.items():
        harness.stubs[scope] = harness.stub(token)
    try:
        yield harness
    finally:
        for channel in harness.channels:
            await channel.close()
        await running.stop(0.5)
        await store.close()
