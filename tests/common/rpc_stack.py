"""The three services in-process on one seeded database, and raw calls to any of their methods.

`open_stack` starts the real cost, manifest and session servers (the session
service with a recording Enqueuer and its background loops off) on a
database of its own cloned from the test template, and seeds it: a scanned
manifest of a small folder, a started session of it with a budget, a
dispatched round (queued runs, budget reservations), a started run and a
recorded cost. `Stack.known` holds the seed's ids and names, for requests
that reach past the id checks.

`METHODS` lists every method of every service in protos/docimport/*/v1/*_pb2.py
(a new one is listed without a change here), with the scopes its servicer's
policy allows. `Stack.call` sends a raw body (any bytes) with a token of
the caller's choosing and returns the status; a streaming method's first
message counts as OK. The `stack` fixture gives a test module one stack.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import ROOT, TOKENS
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2 as spb
from docimport.session.v1 import session_service_pb2_grpc
from google.protobuf import message_factory

from services.common import convert, db
from services.common.auth import OPERATOR_ONLY, Scope
from services.common.channels import aio_channel
from services.common.config import ClientSettings
from services.common.scratchdb import with_database
from services.cost import servicer as cost_servicer
from services.cost.config import CostSettings
from services.cost.server import build_server as build_cost
from services.cost.store import CostStore
from services.manifest import servicer as manifest_servicer
from services.manifest.config import ManifestSettings
from services.manifest.server import build_server as build_manifest
from services.manifest.store import ManifestStore
from services.session import servicer as session_servicer
from services.session.config import SessionSettings
from services.session.server import build_server as build_session
from services.session.store import SessionStore

POLICY = {**cost_servicer.POLICY, **manifest_servicer.POLICY, **session_servicer.POLICY}
SCOPE_TOKENS = {Scope.OPERATOR: TOKENS["operator"], Scope.WORKER: TOKENS["worker"],
                Scope.SERVICE: TOKENS["service"]}


@dataclass(frozen=True)
class Method:
    service: str  # full name, docimport.cost.v1.CostService
    name: str
    request_type: Any  # the generated message class
    server_streaming: bool
    scopes: frozenset[Scope]

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    def __str__(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.name}"


def _methods() -> list[Method]:
    found = []
    for path in sorted((ROOT / "protos" / "docimport").glob("*/v1/*_pb2.py")):
        module = importlib.import_module(".".join(path.relative_to(ROOT / "protos").with_suffix("").parts))
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                full = f"/{service.full_name}/{method.name}"
                found.append(Method(
                    service.full_name, method.name, message_factory.GetMessageClass(method.input_type),
                    method.server_streaming, frozenset(POLICY.get(full, OPERATOR_ONLY)),
                ))
    return found


METHODS = _methods()


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    error: grpc.aio.AioRpcError | None


@dataclass
class Stack:
    ports: dict[str, int]  # service full name -> port
    session_server: Any
    pool: asyncpg.Pool
    case: Path
    known: dict[str, Any] = field(default_factory=dict)
    manifest_json: bytes = b""
    enqueuer: Any = None
    channels: dict[int, grpc.aio.Channel] = field(default_factory=dict)

    def channel(self, service: str) -> grpc.aio.Channel:
        port = self.ports[service]
        if port not in self.channels:
            self.channels[port] = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return self.channels[port]

    async def call(self, method: Method, body: bytes, token: str | None, timeout: float) -> Outcome:
        """Sends `body` as the request of `method`; a stream's first message is OK."""
        channel = self.channel(method.service)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            if not method.server_streaming:
                await channel.unary_unary(method.path)(body, metadata=metadata, timeout=timeout)
                return Outcome(grpc.StatusCode.OK, "", None)
            call = channel.unary_stream(method.path)(body, metadata=metadata, timeout=timeout)
            try:
                first = await call.read()
                if first is grpc.aio.EOF:
                    return Outcome(await call.code(), await call.details(), None)
                return Outcome(grpc.StatusCode.OK, "", None)
            finally:
                call.cancel()
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code(), exc.details() or "", exc)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


def _case_folder(root: Path) -> Path:
    case = root / "seed-case"
    (case / "pleadings").mkdir(parents=True)
    (case / "pleadings" / "complaint.txt").write_text("Complaint of Seed v. Case, filed 2026-01-05.\n")
    (case / "letter.txt").write_text("Dear counsel, please find enclosed $1,200.00.\n")
    (case / "empty.txt").write_bytes(b"")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return case


async def _seed(stack: Stack, manifest: Any, session: Any, cost: Any, worker: Any, costs: Any) -> None:
    """`cost` has a worker's token, `costs` an operator's."""
    scanned = None
    async for event in manifest.AnalyzeSource(mpb.AnalyzeSourceRequest(
            request_id="seed", source_path=str(stack.case), case_name="Seed v. Case")):
        if event.HasField("manifest"):
            scanned = event.manifest
    assert scanned is not None and scanned.state == mpb.MANIFEST_STATE_READY, scanned
    files = (await manifest.ListManifestFiles(
        mpb.ListManifestFilesRequest(manifest_id=scanned.manifest_id))).files
    exported = b"".join([chunk.data async for chunk in manifest.ExportManifest(
        mpb.ExportManifestRequest(manifest_id=scanned.manifest_id))])
    created = (await session.CreateSession(spb.CreateSessionRequest(
        request_id="seed", manifest_id=scanned.manifest_id, project_name="Seed",
        options=spb.SessionOptions(budget=convert.money("10")), start=True))).session
    await stack.session_server.dispatcher.run_once()
    messages = stack.enqueuer.take()
    assert messages, "the seed session dispatched nothing"
    first = messages[0]
    await worker.ReportStageStarted(spb.ReportStageStartedRequest(
        document_id=first.payload.document_id, stage=convert.stage_value(first.payload.stage),
        attempt=first.payload.attempt, task_id=first.task_id, worker="seed-worker"))
    await cost.RecordCosts(cpb.RecordCostsRequest(events=[cpb.CostEvent(
        session_id=created.session_id, document_id=first.payload.document_id,
        stage=convert.stage_value(first.payload.stage), attempt=1, service="local",
        operation="compute_second", units="1.5", kind=cpb.COST_KIND_ACTUAL,
        grant=first.payload.grant)]))  # as a worker does: its run's grant, from its message
    reservations = await stack.pool.fetch("SELECT reservation_id::text FROM cost.reservations")
    stack.manifest_json = exported
    stack.known = {"cursors": await _cursors(stack, manifest, session, costs, scanned.manifest_id,
                                             created.session_id)}
    stack.known |= {
        "by_field": {"session_id": created.session_id, "manifest_id": scanned.manifest_id},
        "session": [created.session_id],
        "ids": [created.session_id, scanned.manifest_id, created.project.project_id,
                *(m.payload.document_id for m in messages), *(f.file_id for f in files),
                *(r[0] for r in reservations), *(m.task_id for m in messages)],
        "paths": [str(stack.case), str(stack.case / "pleadings"), str(stack.case.parent), "/etc"],
        "names": [str(stack.case), str(stack.case.parent), "seed", "Seed v. Case", "Seed", "pleadings",
                  "extract", "text", "local", "compute_second", "seed-worker", "USD", "1", "0.5",
                  "1e20", "-1", "NaN", "0.00000001", ""],
    }


async def _cursors(stack: Stack, manifest: Any, session: Any, cost: Any, manifest_id: str,
                   session_id: str) -> dict[str, dict[str, Any]]:
    """The decoded page token of every listing of the seed, by method (a second manifest and
    session are made so that every listing has a second page)."""
    async for _ in manifest.AnalyzeSource(mpb.AnalyzeSourceRequest(
            request_id="seed-2", source_path=str(stack.case / "pleadings"), case_name="Seed v. Case")):
        pass
    await session.CreateSession(spb.CreateSessionRequest(
        request_id="seed-2", manifest_id=manifest_id, project_name="Seed"))
    pages = {
        "SessionService.ListSessions": await session.ListSessions(spb.ListSessionsRequest(page_size=1)),
        "SessionService.ListSessionDocuments": await session.ListSessionDocuments(
            spb.ListSessionDocumentsRequest(session_id=session_id, page_size=1)),
        "ManifestService.ListManifests": await manifest.ListManifests(mpb.ListManifestsRequest(page_size=1)),
        "ManifestService.ListManifestFiles": await manifest.ListManifestFiles(
            mpb.ListManifestFilesRequest(manifest_id=manifest_id, page_size=1)),
        "CostService.ListCostEvents": await cost.ListCostEvents(
            cpb.ListCostEventsRequest(session_id=session_id, page_size=1)),
    }
    cursors = {name: convert.decode_page_token(page.next_page_token) for name, page in pages.items()}
    assert all(cursors.values()), "a listing of the seed has no second page"
    cursors["CostService.ListPriceBooks"] = {"v": 1}
    return cursors  # type: ignore[return-value]


class _Recording:
    """An Enqueuer that keeps what it was asked to publish (no broker here)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def publish(self, messages: Sequence[Any]) -> None:
        self.messages.extend(messages)

    async def close(self) -> None:
        pass

    def take(self) -> list[Any]:
        taken, self.messages = self.messages, []
        return taken


@contextlib.asynccontextmanager
async def open_stack(pg_admin_url: str, template_db: str, redis_url: str,
                     token_env: dict[str, Any]) -> AsyncIterator[Stack]:
    name = f"di_rpc_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_url)
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    db_url = with_database(pg_admin_url, name)
    pool = await db.create_pool(db_url, min_size=1, max_size=8)
    root = Path(tempfile.mkdtemp(prefix="di-rpc-"))
    client = ClientSettings()
    closers: list[Any] = []
    try:
        cost_settings = CostSettings(database_url=db_url, watch_poll_interval=1.0, **token_env)
        cost_store = CostStore(pool)
        await cost_store.ensure_default_price_book(cost_settings.price_book_file, None)
        cost = await build_cost(cost_settings, store=cost_store)
        closers.append(lambda: cost.stop(0.5))
        cost_channel = aio_channel(f"127.0.0.1:{cost.port}", client, token=TOKENS["service"])
        closers.append(cost_channel.close)
        manifest = await build_manifest(
            ManifestSettings(database_url=db_url, source_roots=(root,), scan_workers=1, **token_env),
            store=ManifestStore(pool), cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel))
        closers.append(lambda: manifest.close(0.5))
        manifest_channel = aio_channel(f"127.0.0.1:{manifest.port}", client, token=TOKENS["service"])
        closers.append(manifest_channel.close)
        session = await build_session(
            SessionSettings(database_url=db_url, broker_url=redis_url, stall_after=60, **token_env),
            store=SessionStore(pool), enqueuer=(recording := _Recording()),
            manifest_stub=manifest_service_pb2_grpc.ManifestServiceStub(manifest_channel),
            cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel), background=False)
        closers.append(lambda: session.stop(0.5))
        stack = Stack(
            ports={cost_servicer.SERVICE_FULL_NAME: cost.port, session_servicer.SERVICE_NAME: session.port,
                   mpb.DESCRIPTOR.services_by_name["ManifestService"].full_name: manifest.port},
            session_server=session, pool=pool, case=_case_folder(root), enqueuer=recording)
        closers.append(stack.close)
        stubs = [aio_channel(f"127.0.0.1:{port}", client, token=TOKENS[scope]) for port, scope in
                 ((manifest.port, "operator"), (session.port, "operator"), (cost.port, "worker"),
                  (session.port, "worker"), (cost.port, "operator"))]
        closers.extend(channel.close for channel in stubs)
        await _seed(stack, manifest_service_pb2_grpc.ManifestServiceStub(stubs[0]),
                    session_service_pb2_grpc.SessionServiceStub(stubs[1]),
                    cost_service_pb2_grpc.CostServiceStub(stubs[2]),
                    session_service_pb2_grpc.SessionServiceStub(stubs[3]),
                    cost_service_pb2_grpc.CostServiceStub(stubs[4]))
        yield stack
    finally:
        for close in reversed(closers):
            await close()
        await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
async def stack(pg_admin_url: str, template_db: str, redis_server_url: Any) -> AsyncIterator[Stack]:
    """The seeded stack, shared by a test module (import this fixture into it)."""
    token_env = {
        "operator_tokens": TOKENS["operator"], "worker_tokens": TOKENS["worker"],
        "service_tokens": TOKENS["service"], "token": TOKENS["service"],
        "host": "127.0.0.1", "port": 0, "shutdown_grace": 1.0,
    }
    redis_url = redis_server_url if isinstance(redis_server_url, str) else redis_server_url.celery_url
    async with open_stack(pg_admin_url, template_db, redis_url, token_env) as made:
        yield made
