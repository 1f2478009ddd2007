"""GetPipelineOverview against the real service, Postgres, Redis and a Celery worker.

Values are checked, not shapes: counts of a session driven through its
stages, throughput, p50/p95 of durations the worker reported, error rates,
stalled documents past the requested threshold, the latest failures with
their text, queue depths of messages really in Redis, and a real worker
answering the broadcast ping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import grpc
import pytest
from celery.contrib.testing.worker import start_worker
from docimport.session.v1 import session_service_pb2 as pb
from google.protobuf import duration_pb2

from services.common import convert
from services.common.tasks import QUEUES, STAGES
from services.session.queue import CeleryEnqueuer, CeleryProbe, StageMessage

from .conftest import open_harness
from .helpers import mfile
from .test_celery import celery_app, payload

EXTRACT = convert.stage_value("extract")


async def overview(h, **fields) -> pb.GetPipelineOverviewResponse:
    return await h.operator.GetPipelineOverview(pb.GetPipelineOverviewRequest(**fields))


async def report(h, message: StageMessage, seconds: float, *, ok: bool = True, text: str = ""):
    p = message.payload
    await h.started(message)
    return await h.worker.ReportStageResult(
        pb.ReportStageResultRequest(
            document_id=p.document_id,
            stage=convert.stage_value(p.stage),
            attempt=p.attempt,
            task_id=message.task_id,
            worker="w1",
            succeeded=ok,
            error_class=0 if ok else pb.ERROR_CLASS_PERMANENT,
            error_message=text,
            duration=duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9)),
            cost=convert.money("0.001"),
        )
    )


async def test_overview_of_a_session_driven_through_its_stages(harness):
    h = harness
    files = [mfile(f"pleadings/doc{i}.pdf") for i in range(10)]
    files.append(mfile("broken/corrupt.pdf", problem="corrupt"))
    session = (await h.create(files, budget="5")).session
    extract = await h.dispatch()
    assert len(extract) == 10
    # extract: durations 1..10 s; the last one fails for good
    for i, m in enumerate(sorted(extract, key=lambda m: m.payload.relative_path)):
        failing = m.payload.relative_path == "pleadings/doc9.pdf"
        text = "boom: no text layer" if failing else ""
        await report(h, m, float(i + 1), ok=not failing, text=text)
    chunk = await h.dispatch()
    assert len(chunk) == 9
    for m in chunk[:4]:
        await report(h, m, 0.5)

    o = await overview(h)
    assert [s.session_id for s in o.sessions] == [session.session_id]
    s = o.sessions[0]
    assert s.state == pb.SESSION_STATE_RUNNING
    c = s.counts
    assert (c.total, c.completed, c.failed, c.pending, c.queued, c.running) == (11, 0, 2, 4, 5, 0)
    assert convert.parse_money(s.options.budget, "b") == 5
    # cost so far comes from the cost service's ledger: nothing recorded there in this test
    assert convert.parse_money(s.cost_so_far, "c", places=16) == 0
    by_stage = {x.stage: x for x in s.stages}
    assert by_stage[EXTRACT].succeeded == 9 and by_stage[EXTRACT].failed == 1

    stats = {(convert.stage_name(x.stage), x.window.seconds): x for x in o.stage_stats}
    assert set(stats) == {(stage, w) for stage in STAGES for w in (3600, 86400)}
    hour = stats[("extract", 3600)]
    assert (hour.finished, hour.succeeded, hour.failed, hour.expired) == (10, 9, 1, 0)
    assert hour.error_rate == pytest.approx(0.1)
    assert hour.runs_per_second == pytest.approx(10 / 3600)
    # percentile_cont over 1..10 s
    assert hour.p50_duration.ToTimedelta().total_seconds() == pytest.approx(5.5)
    assert hour.p95_duration.ToTimedelta().total_seconds() == pytest.approx(9.55)
    assert stats[("extract", 86400)].finished == 10
    chunk_hour = stats[("chunk", 3600)]
    assert (chunk_hour.finished, chunk_hour.error_rate) == (4, 0.0)
    assert chunk_hour.p95_duration.ToTimedelta().total_seconds() == pytest.approx(0.5)
    entities = stats[("entities", 3600)]
    assert entities.finished == 0 and not entities.HasField("p50_duration")

    failures = {f.relative_path: f for f in o.recent_failures}
    assert set(failures) == {"pleadings/doc9.pdf", "broken/corrupt.pdf"}
    assert failures["pleadings/doc9.pdf"].error_message == "boom: no text layer"
    assert failures["pleadings/doc9.pdf"].stage == EXTRACT
    assert "corrupt" in failures["broken/corrupt.pdf"].error_message
    assert o.recent_failures[0].relative_path == "pleadings/doc9.pdf"  # the latest first
    assert (await overview(h, failure_limit=1)).recent_failures[0].relative_path == (
        "pleadings/doc9.pdf"
    )
    # no probe configured: the broker is said to be unknown, not empty
    assert not o.broker.reachable and "no broker" in o.broker.error
    assert o.stalled_total == 0 and o.stall_after.seconds == 60  # the service's threshold


async def test_stalled_documents_follow_the_requested_threshold(harness):
    h = harness
    session = (await h.create([mfile(f"{i}.pdf") for i in range(3)])).session
    queued = await h.dispatch()
    assert len(queued) == 3
    old = queued[0].payload.document_id
    async with h.pool.acquire() as conn:
        await conn.execute(
            "UPDATE session.session_documents SET updated_at = now() - interval '2 hours' "
            "WHERE document_id = $1",
            uuid.UUID(old),
        )
    o = await overview(h)
    assert o.stalled_total == 1
    assert [d.document_id for d in o.stalled_documents] == [old]
    assert o.stalled_documents[0].stalled and o.stalled_documents[0].state == (
        pb.DOCUMENT_STATE_QUEUED
    )
    assert o.sessions[0].counts.stalled == 1
    longer = await overview(h, stall_after=duration_pb2.Duration(seconds=3 * 3600))
    assert longer.stalled_total == 0 and longer.sessions[0].counts.stalled == 0
    assert longer.stall_after.seconds == 3 * 3600
    # finished sessions leave the overview after `finished_within`
    await h.operator.CancelSession(pb.CancelSessionRequest(session_id=session.session_id))
    assert [s.session_id for s in (await overview(h)).sessions] == [session.session_id]
    gone = await overview(h, finished_within=duration_pb2.Duration(seconds=0))
    assert list(gone.sessions) == []


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"stall_after": duration_pb2.Duration(seconds=0)}, "stall_after"),
        ({"finished_within": duration_pb2.Duration(seconds=-1)}, "finished_within"),
        ({"finished_within": duration_pb2.Duration(seconds=8 * 86400)}, "finished_within"),
        ({"failure_limit": 101}, "failure_limit"),
        ({"stalled_limit": -1}, "stalled_limit"),
    ],
)
async def test_bad_requests_are_invalid_arguments(harness, fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await overview(harness, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details() or field in str(caught.value.trailing_metadata())


async def test_only_operators_see_the_overview(harness):
    for scope in ("worker", "service"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.stubs[scope].GetPipelineOverview(pb.GetPipelineOverviewRequest())
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_queue_depths_and_workers_come_from_the_broker(
    session_settings, pool, db_url, token_env, redis_url
):
    enqueuer = CeleryEnqueuer(redis_url)
    probe = CeleryProbe(redis_url, ping_timeout=0.5, workers_ttl=0.2)
    try:
        async with open_harness(
            session_settings, pool, db_url, token_env, enqueuer=enqueuer, probe=probe
        ) as h:
            expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
            await enqueuer.publish(
                [StageMessage(str(uuid.uuid4()), payload("extract"), 60, 90, expires)] * 3
                + [StageMessage(str(uuid.uuid4()), payload("chunk"), 60, 90, expires)]
            )
            o = await overview(h)
            assert o.broker.reachable, o.broker.error
            depths = {q.queue: (q.stage, q.messages) for q in o.queues}
            assert depths == {
                QUEUES["extract"]: (EXTRACT, 3),
                QUEUES["chunk"]: (convert.stage_value("chunk"), 1),
                QUEUES["entities"]: (convert.stage_value("entities"), 0),
            }
            assert list(o.workers) == [] and o.broker.HasField("workers_checked_at")

            app = celery_app(redis_url, lambda request, data: None)
            with start_worker(
                app, perform_ping_check=False, queues=list(QUEUES.values()), shutdown_timeout=5
            ) as worker:

                async def drained_and_seen() -> bool:
                    o = await overview(h)
                    return bool(o.workers) and all(q.messages == 0 for q in o.queues)

                deadline = asyncio.get_running_loop().time() + 20
                while not await drained_and_seen():
                    assert asyncio.get_running_loop().time() < deadline, "worker never seen"
                    await asyncio.sleep(0.2)
                o = await overview(h)
                assert [w.hostname for w in o.workers] == [worker.hostname]
                assert sorted(o.workers[0].queues) == sorted(QUEUES.values())
    finally:
        await probe.close()
        await enqueuer.close()


async def test_an_unreachable_broker_is_reported_not_raised(
    session_settings, pool, db_url, token_env
):
    probe = CeleryProbe("redis://127.0.0.1:1/0", ping_timeout=0.2)
    try:
        async with open_harness(session_settings, pool, db_url, token_env, probe=probe) as h:
            await h.create([mfile("a.pdf")])
            o = await overview(h)
            assert not o.broker.reachable and "Connection" in o.broker.error
            assert list(o.queues) == [] and len(o.sessions) == 1
    finally:
        await probe.close()
