"""Tracing, Flower events and JSON logs of a document through the real stack (issue 6).

The manifest, cost and session services run in-process on ephemeral ports
(the session service with its dispatcher, publishing through the batched
Celery enqueuer to a real Redis); the worker of services/worker runs a
real Celery worker (solo pool, in a thread of this process, so the
in-memory span exporter sees its spans too); the import is the real
`docimport import` command (typer, blocking gRPC stubs) in a thread.

- One trace holds the CLI command, the session service's CreateSession, the
  publish of each stage run, the worker's task and its calls to the cost
  service (RecordCosts) and the session service (ReportStageResults, from the
  worker's delivery thread, in the run's context), each side of those calls,
  parent to child.
- The worker's JSON log lines of a stage carry the session id, document id
  and that trace's id, Celery's own "succeeded" line included.
- A Celery event receiver (what Flower runs) sees task-received events whose
  args name the session and document, and task-succeeded events whose
  result does.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKENS
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2 as pb
from docimport.session.v1 import session_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from typer.testing import CliRunner

from clients.cli.app import app as cli_app
from clients.cli.context import Clients, set_clients
from services.common import logging as jsonlog
from services.common import telemetry
from services.common.channels import aio_channel
from services.common.config import ClientSettings
from services.cost.config import CostSettings
from services.cost.server import build_server as build_cost
from services.cost.store import CostStore
from services.manifest.config import ManifestSettings
from services.manifest.server import build_server as build_manifest
from services.manifest.store import ManifestStore
from services.session.config import SessionSettings
from services.session.queue import CeleryEnqueuer
from services.session.server import build_server as build_session
from services.session.store import SessionStore

from .helpers import wait_for

pytestmark = pytest.mark.integration

STAGES = ("extract", "chunk", "entities")


@dataclass
class Stack:
    manifests: manifest_service_pb2_grpc.ManifestServiceStub
    sessions: session_service_pb2_grpc.SessionServiceStub
    cli: Clients
    worker_app: Any
    source: Path

    async def analyze(self) -> str:
        manifest = None
        async for event in self.manifests.AnalyzeSource(
            mpb.AnalyzeSourceRequest(
                request_id="obs", source_path=str(self.source), case_name="Doe v. Roe"
            )
        ):
            if event.HasField("manifest"):
                manifest = event.manifest
        assert manifest is not None and manifest.state == mpb.MANIFEST_STATE_READY
        return manifest.manifest_id

    async def import_(self, manifest_id: str) -> str:
        """`docimport import --manifest ID --json`; the session id."""
        result = await asyncio.to_thread(
            CliRunner().invoke,
            cli_app,
            ["import", "--manifest", manifest_id, "--json"],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["session"]["session_id"]

    async def finished(self, session_id: str) -> pb.Session:
        async def done() -> bool:
            s = (await self.sessions.GetSession(pb.GetSessionRequest(session_id=session_id))).session
            return s.state == pb.SESSION_STATE_COMPLETED

        await wait_for(done, timeout=90, interval=0.2)
        return (await self.sessions.GetSession(pb.GetSessionRequest(session_id=session_id))).session


@contextlib.asynccontextmanager
async def real_stack(db_url, pool, redis_url, token_env, tmp_path: Path) -> AsyncIterator[Stack]:
    from celery.contrib.testing.worker import start_worker

    from services.worker.app import create_app
    from services.worker.config import WorkerSettings

    root = tmp_path / "sources"
    source = root / "doe-v-roe"
    source.mkdir(parents=True)
    (source / "letter.txt").write_text(
        "Dear counsel, the hearing in Doe v. Roe, No. 24-cv-1234, is set for March 3, 2025.\n"
    )
    client = ClientSettings()
    cost_settings = CostSettings(database_url=db_url, **token_env)
    await CostStore(pool).ensure_default_price_book(cost_settings.price_book_file, None)
    cost = await build_cost(cost_settings, store=CostStore(pool))
    cost_channel = aio_channel(f"127.0.0.1:{cost.port}", client, token=TOKENS["service"])
    manifest = await build_manifest(
        ManifestSettings(database_url=db_url, source_roots=(root,), scan_workers=1, **token_env),
        store=ManifestStore(pool),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
    )
    manifest_channel = aio_channel(f"127.0.0.1:{manifest.port}", client, token=TOKENS["service"])
    enqueuer = CeleryEnqueuer(redis_url)
    session = await build_session(
        SessionSettings(
            database_url=db_url,
            broker_url=redis_url,
            dispatch_interval=0.1,
            reconcile_interval=1.0,
            **token_env,
        ),
        store=SessionStore(pool),
        enqueuer=enqueuer,
        manifest_stub=manifest_service_pb2_grpc.ManifestServiceStub(manifest_channel),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
        background=True,
    )
    operator = [
        aio_channel(f"127.0.0.1:{port}", client, token=TOKENS["operator"])
        for port in (manifest.port, session.port)
    ]
    cli = Clients(
        ClientSettings(
            manifest_addr=f"127.0.0.1:{manifest.port}",
            session_addr=f"127.0.0.1:{session.port}",
            cost_addr=f"127.0.0.1:{cost.port}",
            token=TOKENS["operator"],
            rpc_timeout=30,
        )
    )
    set_clients(cli)
    worker_app = create_app(
        WorkerSettings(
            broker_url=redis_url,
            session_addr=f"127.0.0.1:{session.port}",
            cost_addr=f"127.0.0.1:{cost.port}",
            token=TOKENS["worker"],
            artifact_dir=tmp_path / "artifacts",
            ocr_engine="auto",
            pool="solo",
            rpc_timeout=30.0,
        )
    )
    worker = start_worker(
        worker_app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        loglevel="INFO",
        shutdown_timeout=30.0,
    )
    await asyncio.to_thread(worker.__enter__)
    try:
        yield Stack(
            manifest_service_pb2_grpc.ManifestServiceStub(operator[0]),
            session_service_pb2_grpc.SessionServiceStub(operator[1]),
            cli,
            worker_app,
            source,
        )
    finally:
        await asyncio.to_thread(worker.__exit__, None, None, None)
        worker_app.docimport_runner.get().reporter.close()
        set_clients(None)
        cli.close()
        for channel in (*operator, manifest_channel, cost_channel):
            await channel.close()
        await session.stop(0.5)
        await manifest.close(0.5)
        await cost.stop(0.5)
        await enqueuer.close()


def _method(span: Any) -> str:
    return span.name.rsplit("/", 1)[-1]


async def test_one_trace_holds_the_cli_call_the_services_the_publish_and_the_worker(
    db_url, pool, redis_url, token_env, tmp_path
):
    exporter = InMemorySpanExporter()
    logs = io.StringIO()
    assert not telemetry.enabled()
    telemetry.configure("docimport-test", exporter=exporter)
    jsonlog.configure("test", "INFO", stream=logs)
    try:
        async with real_stack(db_url, pool, redis_url, token_env, tmp_path) as stack:
            manifest_id = await stack.analyze()
            session_id = await stack.import_(manifest_id)
            final = await stack.finished(session_id)
            assert final.counts.completed == 1
            document_id = (
                await stack.sessions.ListSessionDocuments(
                    pb.ListSessionDocumentsRequest(session_id=session_id)
                )
            ).documents[0].document_id
    finally:
        telemetry.disable()
        logging.getLogger().handlers.clear()
    spans = exporter.get_finished_spans()
    exporter.shutdown()

    commands = [s for s in spans if s.name == "docimport import"]
    assert len(commands) == 1, [s.name for s in spans]
    trace_id = commands[0].context.trace_id
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in in_trace}

    def parent(span: Any) -> Any:
        return by_id.get(span.parent.span_id) if span.parent is not None else None

    def find(kind: SpanKind, method: str, **attrs: Any) -> list[Any]:
        return [
            s
            for s in in_trace
            if s.kind == kind
            and (s.name == method or _method(s) == method)
            and all(s.attributes.get(k) == v for k, v in attrs.items())
        ]

    # The CLI's call and the session service serving it.
    (create_client,) = find(SpanKind.CLIENT, "CreateSession")
    assert parent(create_client) is commands[0]
    (create_server,) = find(SpanKind.SERVER, "CreateSession")
    assert parent(create_server) is create_client
    for stage in STAGES:
        # The publish of the stage run, a child of the call that started the session.
        (publish,) = find(
            SpanKind.PRODUCER,
            f"publish docimport.{stage}",
            **{"docimport.session_id": session_id, "docimport.document_id": document_id},
        )
        assert parent(publish) is create_server
        # The worker's task continues the context from the message headers.
        (task,) = find(SpanKind.CONSUMER, f"run/docimport.{stage}")
        assert parent(task) is publish
        # The worker's calls to the cost and session services, and both services serving them.
        for service, method in (("cost", "RecordCosts"), ("session", "ReportStageResults")):
            calls = [c for c in find(SpanKind.CLIENT, method) if parent(c) is task]
            assert len(calls) == 1, (stage, method)
            served = [s for s in find(SpanKind.SERVER, method) if parent(s) is calls[0]]
            assert len(served) == 1, (stage, method, service)
            assert f"docimport.{service}.v1" in calls[0].name
    # The stores' SQL is traced too (asyncpg), inside the services' spans.
    assert any(s.attributes.get("db.system") == "postgresql" for s in in_trace)

    # The worker's JSON log lines carry the session, the document and this trace.
    lines = [json.loads(line) for line in logs.getvalue().splitlines() if line.startswith("{")]
    trace_hex = format(trace_id, "032x")
    ours = [line for line in lines if line.get("logger") == "services.worker.runner"]
    assert {line["message"] for line in ours} >= {
        f"stage {stage} attempt 1 succeeded" for stage in STAGES
    }
    for line in ours:
        assert (line["session_id"], line["document_id"]) == (session_id, document_id), line
        assert line["trace_id"] == trace_hex, line
    succeeded = [
        line
        for line in lines
        if line.get("logger") == "celery.app.trace" and "succeeded" in line["message"]
    ]
    assert len(succeeded) == len(STAGES)
    for line in succeeded:
        assert (line["session_id"], line["document_id"]) == (session_id, document_id), line
        assert line["trace_id"] == trace_hex and line["task_id"], line


async def test_celery_events_name_the_session_and_document_of_each_task(
    db_url, pool, redis_url, token_env, tmp_path
):
    from kombu import Connection

    events: list[dict[str, Any]] = []
    ready = threading.Event()

    receivers: list[Any] = []

    def receive() -> None:
        # What Flower does: an event receiver on the broker.
        from celery import Celery

        monitor = Celery("monitor", broker=redis_url, set_as_current=False)
        with Connection(redis_url) as connection:
            receiver = monitor.events.Receiver(connection, handlers={"*": events.append})
            receivers.append(receiver)
            receiver.on_iteration = ready.set  # subscribed: nothing sent from now on is missed
            # `capture`, checking `should_stop` five times a second
            for _ in receiver.consume(safety_interval=0.2, wakeup=False):
                pass

    thread = threading.Thread(target=receive, name="event-receiver", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 10)
    try:
        async with real_stack(db_url, pool, redis_url, token_env, tmp_path) as stack:
            assert stack.worker_app.conf.worker_send_task_events
            manifest_id = await stack.analyze()
            session_id = await stack.import_(manifest_id)
            await stack.finished(session_id)
            document_id = (
                await stack.sessions.ListSessionDocuments(
                    pb.ListSessionDocumentsRequest(session_id=session_id)
                )
            ).documents[0].document_id

            async def all_succeeded() -> bool:
                return sum(1 for e in list(events) if e["type"] == "task-succeeded") >= len(STAGES)

            await wait_for(all_succeeded, timeout=10)
    finally:
        for receiver in receivers:
            receiver.should_stop = True
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive()
    received = {e["uuid"]: e for e in events if e["type"] == "task-received"}
    done = [e for e in events if e["type"] == "task-succeeded"]
    assert {e["name"] for e in received.values()} == {f"docimport.{s}" for s in STAGES}
    for event in received.values():
        assert f"session_id={session_id}" in event["args"], event
        assert f"document_id={document_id}" in event["args"], event
    assert {e["uuid"] for e in done} == set(received)
    for event in done:
        assert f"'session_id': '{session_id}'" in event["result"], event
        assert f"'document_id': '{document_id}'" in event["result"], event


async def test_with_tracing_off_nothing_is_stored_or_sent(harness):
    """Off, a caller's traceparent is ignored: no context on the session, none in messages."""
    assert not telemetry.enabled()
    created = await harness.create()
    session_id = created.session.session_id
    await harness.operator.PauseSession(pb.PauseSessionRequest(session_id=session_id))
    await harness.operator.ResumeSession(
        pb.ResumeSessionRequest(session_id=session_id),
        metadata=(("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),),
    )
    messages = await harness.dispatch()
    assert len(messages) == 3
    assert all(m.trace_parent is None for m in messages)
    async with harness.pool.acquire() as conn:
        stored = await conn.fetchval(
            "SELECT trace_context FROM session.import_sessions WHERE session_id = $1::uuid",
            session_id,
        )
    assert stored is None
