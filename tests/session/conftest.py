"""Fixtures of the session service tests: the real server on a fresh database.

`harness` starts `services.session.server.build_server` in-process on an
ephemeral port with a recording Enqueuer (no broker), the real cost service
(`services.cost.server.build_server`, default price book) on the same
database, and a small in-process manifest service (`FakeManifestService`)
that serves manifests the test defines. Background loops are off: tests
drive the dispatcher and reconciler with `run_once()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import TOKENS
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2_grpc

from services.common.channels import aio_channel
from services.common.config import ClientSettings
from services.cost.config import CostSettings
from services.cost.server import build_server as build_cost_server
from services.cost.store import CostStore
from services.session.config import SessionSettings
from services.session.server import build_server
from services.session.store import SessionStore

from .helpers import FakeManifestService, Harness, RecordingEnqueuer, readable_case


@pytest.fixture
def session_settings(db_url: str, redis_url: str, token_env: dict[str, object]) -> SessionSettings:
    return SessionSettings(
        database_url=db_url,
        broker_url=redis_url,
        heartbeat_interval=0.5,
        stall_after=60,
        retry_backoff_base=0.0,
        reconcile_interval=0.2,
        dispatch_interval=0.05,
        **token_env,
    )


@contextlib.asynccontextmanager
async def open_harness(
    session_settings: SessionSettings,
    pool: asyncpg.Pool,
    db_url: str,
    token_env: dict[str, object],
    *,
    enqueuer: Any = None,
    probe: Any = None,
    background: bool = False,
) -> AsyncIterator[Harness]:
    """The session service with the real cost service and a fake manifest service."""
    # the real cost service
    cost_settings = CostSettings(database_url=db_url, **token_env)
    cost_store = CostStore(pool)
    await cost_store.ensure_default_price_book(
        cost_settings.price_book_file, cost_settings.cpu_second_rate
    )
    cost_server = await build_cost_server(cost_settings, store=cost_store)
    # the manifest service, faked
    manifests = FakeManifestService()
    manifest_server = grpc.aio.server()
    manifest_service_pb2_grpc.add_ManifestServiceServicer_to_server(manifests, manifest_server)
    manifest_port = manifest_server.add_insecure_port("127.0.0.1:0")
    await manifest_server.start()
    client = ClientSettings()
    manifest_channel = aio_channel(f"127.0.0.1:{manifest_port}", client, token=TOKENS["service"])
    cost_channel = aio_channel(f"127.0.0.1:{cost_server.port}", client, token=TOKENS["service"])
    store = SessionStore(pool)
    recording = RecordingEnqueuer()
    server = await build_server(
        session_settings,
        store=store,
        enqueuer=enqueuer or recording,
        manifest_stub=manifest_service_pb2_grpc.ManifestServiceStub(manifest_channel),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
        probe=probe,
        background=background,
    )
    h = Harness(
        session_settings,
        server,
        store,
        pool,
        recording,
        manifests,
        cost_server.port,
        server.port,
        manifest_port=manifest_port,
        channels=[manifest_channel, cost_channel],
    )
    for scope, token in TOKENS.items():
        h.stubs[scope] = h.stub(token)
    operator_cost = aio_channel(f"127.0.0.1:{cost_server.port}", client, token=TOKENS["operator"])
    h.channels.append(operator_cost)
    h.cost = cost_service_pb2_grpc.CostServiceStub(operator_cost)
    try:
        yield h
    finally:
        await server.stop(0.5)
        for channel in h.channels:
            await channel.close()
        await manifest_server.stop(0)
        await cost_server.stop(0.5)


@pytest.fixture
async def harness(
    session_settings: SessionSettings, pool: asyncpg.Pool, db_url: str, token_env: dict[str, object]
) -> AsyncIterator[Harness]:
    async with open_harness(session_settings, pool, db_url, token_env) as h:
        yield h


@pytest.fixture
def case_copy() -> Iterator[Path]:
    """A world-readable copy of examples/sample-case (the scan refuses nothing it can read)."""
    with readable_case() as target:
        yield target
