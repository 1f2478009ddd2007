"""Real Celery: the pipelined publisher's messages run on a real worker, end to end.

A test-local Celery app stands in for the worker (services/worker has the
real one): its tasks report to the session service over gRPC exactly as a
worker does, and do no processing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from conftest import TOKENS
from docimport.session.v1 import session_service_pb2 as pb
from docimport.session.v1 import session_service_pb2_grpc

from services.common import convert
from services.common.channels import sync_channel
from services.common.config import ClientSettings
from services.common.tasks import QUEUES, STAGES, TASK_NAMES, StagePayload
from services.session.queue import CeleryEnqueuer, StageMessage
from services.worker import control  # noqa: F401 - the stand-in worker answers docimport_held

from .conftest import open_harness
from .helpers import mfile, tune, wait_for


def payload(stage: str, document_id: str | None = None) -> StagePayload:
    return StagePayload(
        session_id=str(uuid.uuid4()),
        document_id=document_id or str(uuid.uuid4()),
        stage=stage,
        attempt=1,
        source_path="/data",
        relative_path="a.pdf",
        raw_path_b64="YS5wZGY=",
        sha256="0" * 64,
        size_bytes=10,
        plan="text_layer",
    )


def celery_app(broker: str, on_run: Any) -> Celery:
    app = Celery("docimport-test-worker", broker=broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    for stage in STAGES:

        def make(stage: str = stage) -> None:
            @app.task(
                name=TASK_NAMES[stage], bind=True, queue=QUEUES[stage], acks_late=True, shared=False
            )
            def run(self: Any, data: dict[str, Any]) -> None:
                on_run(self.request, data)

        make()
    return app


async def test_pipelined_messages_are_celery_messages(redis_url):
    enqueuer = CeleryEnqueuer(redis_url, batch_size=2)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    messages = [
        StageMessage(str(uuid.uuid4()), payload(stage), 120 + i, 150 + i, expires)
        for i, stage in enumerate(STAGES)
    ]
    await enqueuer.publish(messages)
    await enqueuer.close()
    seen: list[tuple[Any, dict[str, Any]]] = []
    lock = threading.Lock()

    def on_run(request: Any, data: dict[str, Any]) -> None:
        with lock:
            seen.append((request, data))

    app = celery_app(redis_url, on_run)
    with start_worker(
        app, perform_ping_check=False, queues=list(QUEUES.values()), shutdown_timeout=5
    ):
        await wait_for(lambda: len(seen) == 3, timeout=15)
    by_id = {r.id: (r, d) for r, d in seen}
    for m in messages:
        request, data = by_id[m.task_id]
        assert StagePayload.from_json(data) == m.payload
        assert tuple(request.timelimit) == (m.time_limit, m.soft_time_limit)
        assert request.delivery_info["routing_key"] == m.stage


class ReportingWorker:
    """Celery tasks that report to the session service like a real worker, doing no work."""

    def __init__(self, session_port: int, *, fail: set[str] = frozenset()) -> None:
        channel = sync_channel(
            f"127.0.0.1:{session_port}", ClientSettings(), token=TOKENS["worker"]
        )
        self.stub = session_service_pb2_grpc.SessionServiceStub(channel)
        self.channel = channel
        self.runs = 0
        self.lock = threading.Lock()

    def __call__(self, request: Any, data: dict[str, Any]) -> None:
        p = StagePayload.from_json(data)
        key = dict(
            document_id=p.document_id,
            stage=convert.stage_value(p.stage),
            attempt=p.attempt,
            task_id=request.id,
            worker="test-worker",
        )
        started = self.stub.ReportStageStarted(pb.ReportStageStartedRequest(**key))
        if not started.proceed:
            return
        with self.lock:
            self.runs += 1
        self.stub.ReportStageResult(
            pb.ReportStageResultRequest(**key, succeeded=True, cost=convert.money("0.0001"))
        )


@pytest.fixture
def worker_factory(redis_url: str) -> Iterator[Any]:
    contexts = []

    def start(port: int) -> ReportingWorker:
        reporter = ReportingWorker(port)
        app = celery_app(redis_url, reporter)
        ctx = start_worker(
            app, perform_ping_check=False, queues=list(QUEUES.values()), shutdown_timeout=5
        )
        ctx.__enter__()
        contexts.append((ctx, reporter))
        return reporter

    yield start
    for ctx, reporter in contexts:
        ctx.__exit__(None, None, None)
        reporter.channel.close()


async def get(h, session_id: str) -> pb.Session:
    return (await h.operator.GetSession(pb.GetSessionRequest(session_id=session_id))).session


async def test_end_to_end_through_real_celery(
    session_settings, pool, db_url, token_env, redis_url, worker_factory
):
    enqueuer = CeleryEnqueuer(redis_url)
    try:
        async with open_harness(
            session_settings, pool, db_url, token_env, enqueuer=enqueuer, background=True
        ) as h:
            session = (
                await h.create([mfile(f"{i}.pdf") for i in range(30)], max_in_flight=8)
            ).session
            reporter = await asyncio.to_thread(worker_factory, h.port)

            async def done() -> bool:
                return (await get(h, session.session_id)).state == pb.SESSION_STATE_COMPLETED

            await wait_for(done, timeout=60, interval=0.1)
            final = await get(h, session.session_id)
            assert final.counts.completed == 30 and reporter.runs == 90
            assert [s.succeeded for s in final.stages] == [30, 30, 30]
    finally:
        await enqueuer.close()


async def test_redis_losing_its_queues_loses_no_document(
    session_settings, pool, db_url, token_env, redis_url, worker_factory
):
    enqueuer = CeleryEnqueuer(redis_url)
    try:
        async with open_harness(
            session_settings, pool, db_url, token_env, enqueuer=enqueuer, background=True
        ) as h:
            # short leases: a run unseen (in no queue, held by no worker) for 1 s is lost
            tune(h, lease_ttl=1.0, probe_interval=0.2, reconcile_interval=0.2)
            session = (
                await h.create([mfile(f"{i}.pdf") for i in range(10)], max_in_flight=10)
            ).session

            async def queued() -> bool:
                return (await get(h, session.session_id)).counts.queued == 10

            await wait_for(queued, timeout=10)
            client = redis.Redis.from_url(redis_url)
            client.flushdb()  # the broker loses every message
            client.close()
            reporter = await asyncio.to_thread(worker_factory, h.port)

            async def done() -> bool:
                return (await get(h, session.session_id)).state == pb.SESSION_STATE_COMPLETED

            await wait_for(done, timeout=60, interval=0.1)
            final = await get(h, session.session_id)
            assert final.counts.completed == 10
            async with h.pool.acquire() as conn:
                per_stage = await conn.fetch(
                    "SELECT stage, count(*) AS n FROM session.stage_runs WHERE state = 'succeeded' GROUP BY stage"
                )
                expired = await conn.fetchval(
                    "SELECT count(*) FROM session.stage_runs WHERE state = 'expired'"
                )
            assert {r["stage"]: r["n"] for r in per_stage} == dict.fromkeys(STAGES, 10)
            assert expired >= 10
            assert reporter.runs == 30
    finally:
        await enqueuer.close()


class SlowExtractWorker(ReportingWorker):
    """Takes `seconds` over each extract, reporting its start first (a lease of lease_ttl)."""

    def __init__(self, session_port: int, seconds: float) -> None:
        super().__init__(session_port)
        self.seconds = seconds

    def __call__(self, request: Any, data: dict[str, Any]) -> None:
        if StagePayload.from_json(data).stage == "extract":
            import time

            time.sleep(self.seconds)
        super().__call__(request, data)


async def test_runs_a_worker_holds_keep_their_lease_however_long_they_take(
    session_settings, pool, db_url, token_env, redis_url
):
    """Leases of 3 s, runs of 5 s: the lease keeper sees the running run and the one the
    worker prefetched (its docimport_held answer) and the one still in Redis (the list), and
    renews them; none is expired and run again."""
    enqueuer = CeleryEnqueuer(redis_url)
    try:
        async with open_harness(
            session_settings, pool, db_url, token_env, enqueuer=enqueuer, background=True
        ) as h:
            tune(h, lease_ttl=3.0, probe_interval=0.2, reconcile_interval=0.2)
            session = (
                await h.create([mfile(f"{i}.pdf") for i in range(3)], max_in_flight=3)
            ).session
            reporter = SlowExtractWorker(h.port, 5.0)
            app = celery_app(redis_url, reporter)
            with start_worker(
                app, pool="threads", concurrency=1, perform_ping_check=False,
                queues=list(QUEUES.values()), shutdown_timeout=5,
            ):

                async def done() -> bool:
                    return (await get(h, session.session_id)).state == pb.SESSION_STATE_COMPLETED

                await wait_for(done, timeout=60, interval=0.2)
            reporter.channel.close()
            async with h.pool.acquire() as conn:
                runs = await conn.fetch(
                    "SELECT stage, attempt, state FROM session.stage_runs WHERE session_id = $1",
                    uuid.UUID(session.session_id),
                )
            assert {(r["attempt"], r["state"]) for r in runs} == {(1, "succeeded")}, runs
            assert reporter.runs == 9
    finally:
        await enqueuer.close()
