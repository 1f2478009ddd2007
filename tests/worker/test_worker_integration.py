"""A real Celery worker against a real Redis, reporting to in-process gRPC servers.

The worker runs in a thread (celery.contrib.testing.worker.start_worker,
solo pool) consuming the three stage queues of `redis_url`. The session and
cost services it reports to are small grpc.aio servicers that implement
ReportStageStarted / ReportStageResult and RecordCosts and record what they
receive: test doubles of OUR OWN services, standing in while the real ones
are built alongside this worker (no third-party service is mocked). Tasks are
published the way the session service does: by name, with Celery's
`send_task`, and as raw protocol-2 messages on the default exchange with
per-message time limits (services/session/queue.py's format).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from celery import Celery
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2, cost_service_pb2_grpc
from docimport.session.v1 import session_service_pb2, session_service_pb2_grpc

from services.common import convert
from services.common.artifacts import path_of, verify_artifact
from services.common.tasks import QUEUES, TASK_NAMES, StagePayload
from services.worker.app import create_app
from services.worker.config import WorkerSettings

from .helpers import payload

pytestmark = pytest.mark.integration

WORKER_TOKEN = "wk-test-token"
PRICES = {
    ("local", "compute_second"): Decimal("0.00001389"),
    ("aws_textract", "ocr_page"): Decimal("0.0015"),
}


class RecordingSession(session_service_pb2_grpc.SessionServiceServicer):
    """Test double of docimport's SessionService: records worker reports."""

    def __init__(self) -> None:
        self.started: list[session_service_pb2.ReportStageStartedRequest] = []
        self.results: list[session_service_pb2.ReportStageResultRequest] = []
        self.tokens: list[str] = []
        self.unwanted: set[str] = set()

    async def ReportStageStarted(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.started.append(request)
        self.tokens.append(dict(context.invocation_metadata() or ()).get("authorization", ""))
        lease = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
        return session_service_pb2.ReportStageStartedResponse(
            proceed=request.document_id not in self.unwanted,
            lease_expires_at=convert.timestamp(lease),
        )

    async def ReportStageResult(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.results.append(request)
        return session_service_pb2.ReportStageResultResponse(
            document_state=session_service_pb2.DOCUMENT_STATE_RUNNING
        )

    async def ReportStageResults(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        answers = [
            session_service_pb2.StageResultAnswer(result=await self.ReportStageResult(r, context))
            for r in request.reports
        ]
        return session_service_pb2.ReportStageResultsResponse(answers=answers)

    def result_for(
        self, document_id: str, stage: int
    ) -> session_service_pb2.ReportStageResultRequest | None:
        return next(
            (r for r in self.results if r.document_id == document_id and r.stage == stage), None
        )


class RecordingCost(cost_service_pb2_grpc.CostServiceServicer):
    """Test double of docimport's CostService: prices events like the default book."""

    def __init__(self) -> None:
        self.requests: list[cost_service_pb2.RecordCostsRequest] = []

    async def RecordCosts(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.requests.append(request)
        total = Decimal(0)
        recorded = []
        for event in request.events:
            amount = Decimal(0)
            if not event.cache_hit:
                amount = Decimal(event.units) * PRICES[(event.service, event.operation)]
            total += amount
            recorded.append(cost_service_pb2.CostEvent())
            recorded[-1].CopyFrom(event)
            recorded[-1].amount.CopyFrom(common_pb2.Money(currency_code="USD", amount=str(amount)))
        return cost_service_pb2.RecordCostsResponse(
            events=recorded, total=common_pb2.Money(currency_code="USD", amount=str(total))
        )

    def events_for(self, document_id: str) -> list[cost_service_pb2.CostEvent]:
        return [e for r in self.requests for e in r.events if e.document_id == document_id]


@dataclass
class Stack:
    session: RecordingSession
    cost: RecordingCost
    publisher: Celery
    settings: WorkerSettings
    redis_url: str
    sent: list[str] = field(default_factory=list)

    def send(self, p: StagePayload) -> str:
        """As the session service would with `send_task` (the task id is chosen first)."""
        task_id = str(uuid.uuid4())
        self.publisher.send_task(
            TASK_NAMES[p.stage], args=[p.to_json()], queue=QUEUES[p.stage], task_id=task_id
        )
        self.sent.append(task_id)
        return task_id

    def send_raw(self, p: StagePayload, *, time_limit: float, soft_time_limit: float) -> str:
        """As services/session/queue.py publishes: protocol 2 on the default exchange."""
        task_id = str(uuid.uuid4())
        headers, properties, body, _ = self.publisher.amqp.as_task_v2(
            task_id,
            TASK_NAMES[p.stage],
            args=(p.to_json(),),
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            expires=(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).isoformat(),
        )
        with self.publisher.producer_or_acquire() as producer:
            producer.publish(
                body,
                exchange="",
                routing_key=QUEUES[p.stage],
                headers=headers,
                serializer="json",
                delivery_mode=2,
                **properties,
            )
        self.sent.append(task_id)
        return task_id


async def until(condition: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting for the worker")
        await asyncio.sleep(0.05)


@dataclass
class Servers:
    session: RecordingSession
    cost: RecordingCost
    address: str


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    session, cost = RecordingSession(), RecordingCost()
    server = grpc.aio.server()
    session_service_pb2_grpc.add_SessionServiceServicer_to_server(session, server)
    cost_service_pb2_grpc.add_CostServiceServicer_to_server(cost, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Servers(session, cost, f"127.0.0.1:{port}")
    finally:
        await server.stop(0)


def make_publisher(redis_url: str) -> Celery:
    publisher = Celery("test-publisher", broker=redis_url, set_as_current=False)
    publisher.conf.update(
        task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True
    )
    return publisher


@pytest.fixture
async def stack(servers: Servers, redis_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    """A worker thread (solo pool) on all three queues."""
    from celery.contrib.testing.worker import start_worker

    settings = WorkerSettings(
        broker_url=redis_url,
        session_addr=servers.address,
        cost_addr=servers.address,
        token=WORKER_TOKEN,
        artifact_dir=tmp_path / "artifacts",
        ocr_engine="auto",
        pool="solo",
        rpc_timeout=10.0,
    )
    app = create_app(settings)
    publisher = make_publisher(redis_url)
    worker = start_worker(
        app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=30.0,
    )
    await asyncio.to_thread(worker.__enter__)
    try:
        yield Stack(servers.session, servers.cost, publisher, settings, redis_url)
    finally:
        await asyncio.to_thread(worker.__exit__, None, None, None)
        app.docimport_runner.get().reporter.close()
        publisher.close()
        app.close()


async def test_stages_run_through_a_real_worker_and_report_over_grpc(stack: Stack) -> None:
    extract = payload("pleadings/complaint.pdf")
    corrupt = payload("medical_records/corrupt_scan.pdf", session_id=extract.session_id)
    photo = payload("discovery/site_photo.png", session_id=extract.session_id)
    stack.send(extract)
    stack.send_raw(corrupt, time_limit=120, soft_time_limit=100)
    stack.send(photo)
    await until(lambda: len(stack.session.results) >= 3)

    ok = stack.session.result_for(extract.document_id, common_pb2.STAGE_EXTRACT)
    assert ok is not None and ok.succeeded and ok.stats.pages == 3
    assert ok.task_id in stack.sent and ok.worker
    (text,) = ok.artifacts
    assert (
        text.kind == "text"
        and verify_artifact(text.uri, text.sha256, text.size_bytes, deep=True).ok
    )
    assert path_of(text.uri).is_relative_to(stack.settings.artifact_dir.resolve())
    (compute,) = stack.cost.events_for(extract.document_id)
    assert (compute.service, compute.operation, compute.kind) == (
        "local",
        "compute_second",
        cost_service_pb2.COST_KIND_ACTUAL,
    )
    assert Decimal(ok.cost.amount) == Decimal(compute.units) * PRICES[("local", "compute_second")]

    bad = stack.session.result_for(corrupt.document_id, common_pb2.STAGE_EXTRACT)
    assert bad is not None and not bad.succeeded
    assert (bad.error_class, bad.error_code) == (
        session_service_pb2.ERROR_CLASS_PERMANENT,
        "corrupt",
    )

    ocr = stack.session.result_for(photo.document_id, common_pb2.STAGE_EXTRACT)
    assert ocr is not None and ocr.succeeded and ocr.stats.ocr_pages == 1
    assert "Philadelphia" in json.loads(path_of(ocr.artifacts[0].uri).read_bytes())["text"]

    # The next stages read the extract artifact by the file's sha256.
    for stage in ("chunk", "entities"):
        stack.send(
            payload(
                "pleadings/complaint.pdf",
                stage,
                session_id=extract.session_id,
                document_id=extract.document_id,
            )
        )
    await until(lambda: stack.session.result_for(extract.document_id, common_pb2.STAGE_ENTITIES))
    chunks = stack.session.result_for(extract.document_id, common_pb2.STAGE_CHUNK)
    assert chunks is not None and chunks.succeeded and chunks.stats.chunks > 0
    entities = stack.session.result_for(extract.document_id, common_pb2.STAGE_ENTITIES)
    assert entities is not None and entities.succeeded
    found = json.loads(path_of(entities.artifacts[0].uri).read_bytes())["entities"]
    texts = {(e["type"], e["text"]) for e in found}
    assert {
        ("case_number", "2:24-cv-01234"),
        ("money", "$250,000.00"),
        ("citation", "Brown v. Board of Education, 347 U.S. 483 (1954)"),
        ("email", "apatel@patelinjurylaw.example"),
        ("phone", "(215) 555-0143"),
    } <= texts

    # Every call carried the worker's token; nothing was enqueued by the worker.
    assert stack.session.tokens and set(stack.session.tokens) == {f"Bearer {WORKER_TOKEN}"}
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    try:
        assert [client.llen(q) for q in QUEUES.values()] == [0, 0, 0]
        assert not [k for k in client.keys("*") if k.startswith(b"celery-task-meta")]
    finally:
        client.close()


async def test_identical_file_in_another_session_is_a_cache_hit(stack: Stack) -> None:
    first = payload("medical_records/er_visit_summary.pdf")
    stack.send(first)
    await until(lambda: stack.session.result_for(first.document_id, common_pb2.STAGE_EXTRACT))
    copy = payload("medical_records/er_visit_summary_copy.pdf")  # same bytes, new session
    stack.send(copy)
    hit = await until(lambda: stack.session.result_for(copy.document_id, common_pb2.STAGE_EXTRACT))
    original = stack.session.result_for(first.document_id, common_pb2.STAGE_EXTRACT)
    assert original is not None and not original.cache_hit
    assert hit.succeeded and hit.cache_hit and hit.cost.amount == "0"
    assert list(hit.artifacts) == list(original.artifacts)
    (saved,) = stack.cost.events_for(copy.document_id)
    assert saved.cache_hit and saved.session_id == copy.session_id
    (spent,) = stack.cost.events_for(first.document_id)
    assert Decimal(saved.units) > 0 and Decimal(saved.units) <= Decimal(spent.units)


async def test_a_run_the_session_no_longer_wants_does_nothing(stack: Stack) -> None:
    unwanted = payload("pleadings/answer.pdf")
    stack.session.unwanted.add(unwanted.document_id)
    marker = payload("correspondence/call_notes.txt")
    stack.send(unwanted)
    stack.send(marker)
    await until(lambda: stack.session.result_for(marker.document_id, common_pb2.STAGE_EXTRACT))
    assert any(s.document_id == unwanted.document_id for s in stack.session.started)
    assert stack.session.result_for(unwanted.document_id, common_pb2.STAGE_EXTRACT) is None
    assert stack.cost.events_for(unwanted.document_id) == []
    assert not (stack.settings.artifact_dir / unwanted.sha256[:2]).exists()


async def test_docimport_worker_prefork_process_honours_the_soft_time_limit(
    servers: Servers, redis_url: str, tmp_path: Path
) -> None:
    """The console script itself: env-only config, prefork child, per-message time limits."""
    import os
    import signal
    import subprocess
    import sys

    artifacts = tmp_path / "artifacts"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DOCIMPORT_BROKER_URL": redis_url,
        "DOCIMPORT_SESSION_ADDR": servers.address,
        "DOCIMPORT_COST_ADDR": servers.address,
        "DOCIMPORT_TOKEN": WORKER_TOKEN,
        "DOCIMPORT_ARTIFACT_DIR": str(artifacts),
        "DOCIMPORT_QUEUES": "extract",
        "DOCIMPORT_POOL": "prefork",
        "DOCIMPORT_CONCURRENCY": "1",
        "DOCIMPORT_LOG_LEVEL": "INFO",
    }
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.worker"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    publisher = make_publisher(redis_url)
    stack = Stack(
        servers.session, servers.cost, publisher, WorkerSettings(broker_url=redis_url), redis_url
    )
    try:
        quick = payload("pleadings/answer.pdf")
        slow = payload("discovery/scanned_deposition_excerpt.pdf")  # OCR of 2 pages takes seconds
        stack.send_raw(quick, time_limit=60, soft_time_limit=50)
        stack.send_raw(slow, time_limit=60, soft_time_limit=1.5)
        done = await until(
            lambda: len(servers.session.results) >= 2 and servers.session.results, timeout=90
        )
        ok = stack.session.result_for(quick.document_id, common_pb2.STAGE_EXTRACT)
        assert ok is not None and ok.succeeded, done
        assert ok.worker.startswith("docimport-extract@") and ok.worker.rsplit(":", 1)[1] != str(
            process.pid
        )
        assert path_of(ok.artifacts[0].uri).is_relative_to(artifacts.resolve())
        cut = stack.session.result_for(slow.document_id, common_pb2.STAGE_EXTRACT)
        assert cut is not None and not cut.succeeded
        assert (cut.error_class, cut.error_code) == (
            session_service_pb2.ERROR_CLASS_RETRYABLE,
            "time_limit",
        )
        (compute,) = stack.cost.events_for(slow.document_id)
        assert Decimal(compute.units) >= Decimal("1")  # the OCR done before the limit is charged
    finally:
        publisher.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
