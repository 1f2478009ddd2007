"""The whole docimport stack in-process, for end-to-end tests of the sample case.

`sample_stack` starts the real cost, manifest and session services (the
session service with its dispatcher and reconciler running, the pipelined
Celery publisher and the broker probe) and the real worker of
services/worker (solo pool, in a thread), and yields operator stubs of the
three services. `import_sample` scans the case and imports it with a budget,
and returns the session id once the session has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import TOKENS
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2 as pb
from docimport.session.v1 import session_service_pb2_grpc

from services.common import convert
from services.common.channels import aio_channel
from services.common.config import ClientSettings
from services.cost.config import CostSettings
from services.cost.server import build_server as build_cost
from services.cost.store import CostStore
from services.manifest.config import ManifestSettings
from services.manifest.server import build_server as build_manifest
from services.manifest.store import ManifestStore
from services.session.config import SessionSettings
from services.session.queue import CeleryEnqueuer, CeleryProbe
from services.session.server import build_server as build_session
from services.session.store import SessionStore

from .helpers import wait_for


@dataclass
class Stack:
    case: Path
    session_port: int
    cost_port: int
    manifest_port: int
    manifests: manifest_service_pb2_grpc.ManifestServiceStub
    sessions: session_service_pb2_grpc.SessionServiceStub
    costs: cost_service_pb2_grpc.CostServiceStub
    worker_hostname: str = ""
    scanned: Any = None

    async def import_sample(self, *, budget: str = "25", timeout: float = 240) -> str:
        """Scans the case, imports it, waits for the session to finish; its id."""
        async for event in self.manifests.AnalyzeSource(
            mpb.AnalyzeSourceRequest(
                request_id="sample", source_path=str(self.case), case_name="Smith v. Jones"
            )
        ):
            if event.HasField("manifest"):
                self.scanned = event.manifest
        assert self.scanned is not None and self.scanned.state == mpb.MANIFEST_STATE_READY
        created = await self.sessions.CreateSession(
            pb.CreateSessionRequest(
                request_id="sample-import",
                manifest_id=self.scanned.manifest_id,
                project_name="Smith v. Jones",
                options=pb.SessionOptions(budget=convert.money(budget)),
                start=True,
            )
        )
        session_id = created.session.session_id

        async def finished() -> bool:
            request = pb.GetSessionRequest(session_id=session_id)
            s = (await self.sessions.GetSession(request)).session
            return s.state in (pb.SESSION_STATE_COMPLETED, pb.SESSION_STATE_COMPLETED_WITH_ERRORS)

        await wait_for(finished, timeout=timeout, interval=0.5)
        return session_id


@contextlib.asynccontextmanager
async def sample_stack(
    db_url: str, pool: Any, redis_url: str, token_env: dict[str, Any], case: Path, tmp_path: Path
) -> AsyncIterator[Stack]:
    from celery.contrib.testing.worker import start_worker

    from services.worker.app import create_app
    from services.worker.config import WorkerSettings

    client = ClientSettings()
    cost = await build_cost(CostSettings(database_url=db_url, **token_env), store=CostStore(pool))
    await CostStore(pool).ensure_default_price_book(
        CostSettings(database_url=db_url, **token_env).price_book_file, None
    )
    cost_channel = aio_channel(f"127.0.0.1:{cost.port}", client, token=TOKENS["service"])
    manifest = await build_manifest(
        ManifestSettings(
            database_url=db_url, source_roots=(case.parent,), scan_workers=1, **token_env
        ),
        store=ManifestStore(pool),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
    )
    manifest_channel = aio_channel(f"127.0.0.1:{manifest.port}", client, token=TOKENS["service"])
    enqueuer = CeleryEnqueuer(redis_url)
    probe = CeleryProbe(redis_url, ping_timeout=0.5, workers_ttl=1.0)
    settings = SessionSettings(
        database_url=db_url,
        broker_url=redis_url,
        dispatch_interval=0.1,
        reconcile_interval=1.0,
        **token_env,
    )
    session_server = await build_session(
        settings,
        store=SessionStore(pool),
        enqueuer=enqueuer,
        manifest_stub=manifest_service_pb2_grpc.ManifestServiceStub(manifest_channel),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
        probe=probe,
        background=True,
    )
    operator_channels = [
        aio_channel(f"127.0.0.1:{port}", client, token=TOKENS["operator"])
        for port in (manifest.port, session_server.port, cost.port)
    ]
    worker_settings = WorkerSettings(
        broker_url=redis_url,
        session_addr=f"127.0.0.1:{session_server.port}",
        cost_addr=f"127.0.0.1:{cost.port}",
        token=TOKENS["worker"],
        artifact_dir=tmp_path / "artifacts",
        ocr_engine="auto",
        pool="solo",
        rpc_timeout=30.0,
    )
    app = create_app(worker_settings)
    worker = start_worker(
        app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30.0,
    )
    controller = await asyncio.to_thread(worker.__enter__)
    try:
        yield Stack(
            case=case,
            session_port=session_server.port,
            cost_port=cost.port,
            manifest_port=manifest.port,
            manifests=manifest_service_pb2_grpc.ManifestServiceStub(operator_channels[0]),
            sessions=session_service_pb2_grpc.SessionServiceStub(operator_channels[1]),
            costs=cost_service_pb2_grpc.CostServiceStub(operator_channels[2]),
            worker_hostname=controller.hostname,
        )
    finally:
        await asyncio.to_thread(worker.__exit__, None, None, None)
        app.docimport_runner.get().reporter.close()
        app.close()
        await session_server.stop(1.0)
        await probe.close()
        await enqueuer.close()
        for channel in [*operator_channels, manifest_channel, cost_channel]:
            await channel.close()
        await manifest.close(1.0)
        await cost.stop(1.0)
