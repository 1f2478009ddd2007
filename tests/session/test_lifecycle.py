"""Reconciler, pause/resume/cancel, budgets and retries."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import grpc
import pytest
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.session.v1 import session_service_pb2 as pb

from services.common import convert

from .helpers import mfile, tune


async def get(harness, session_id: str) -> pb.Session:
    return (await harness.operator.GetSession(pb.GetSessionRequest(session_id=session_id))).session


async def expire_all_leases(harness) -> None:
    async with harness.pool.acquire() as conn:
        await conn.execute(
            "UPDATE session.stage_runs SET lease_expires_at = now() - interval '1 s' "
            "WHERE state IN ('queued', 'running')"
        )


async def test_expired_lease_is_re_enqueued_as_a_new_attempt(harness):
    session = (await harness.create([mfile("a.pdf"), mfile("b.pdf")])).session
    lost = await harness.dispatch()
    await harness.started(lost[0])  # one dies while running, the other message is lost in Redis
    await expire_all_leases(harness)
    assert await harness.reconciler.run_once() == 2
    retried = await harness.dispatch()
    assert sorted(m.payload.attempt for m in retried) == [2, 2]
    assert {m.task_id for m in retried}.isdisjoint({m.task_id for m in lost})
    doc = (
        await harness.operator.GetDocument(
            pb.GetDocumentRequest(document_id=lost[0].payload.document_id)
        )
    ).document
    assert [r.state for r in doc.stage_runs] == [
        pb.STAGE_RUN_STATE_EXPIRED,
        pb.STAGE_RUN_STATE_QUEUED,
    ]
    assert "lease expired while running" in doc.stage_runs[0].error_message
    # the late worker of attempt 1 is told to stop, and its late result changes nothing
    assert not (await harness.started(lost[1])).proceed
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await harness.result(lost[0])
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    doc = (
        await harness.operator.GetDocument(
            pb.GetDocumentRequest(document_id=lost[0].payload.document_id)
        )
    ).document
    assert doc.state == pb.DOCUMENT_STATE_QUEUED
    for m in retried:
        await harness.result(m)
    final = await harness.run_to_end(session.session_id)
    assert final.state == pb.SESSION_STATE_COMPLETED
    async with harness.pool.acquire() as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM session.stage_runs WHERE state = 'succeeded' AND stage = 'extract'"
            )
            == 2
        )


async def test_repeated_expiry_fails_the_document(harness):
    tune(harness, max_attempts=2)
    session = (await harness.create([mfile("poison.pdf")])).session
    for _ in range(2):
        assert len(await harness.dispatch()) == 1
        await expire_all_leases(harness)
        await harness.reconciler.run_once()
    s = await get(harness, session.session_id)
    assert s.counts.failed == 1 and s.state == pb.SESSION_STATE_COMPLETED_WITH_ERRORS
    docs = (
        await harness.operator.ListSessionDocuments(
            pb.ListSessionDocumentsRequest(
                session_id=session.session_id, state=pb.DOCUMENT_STATE_FAILED
            )
        )
    ).documents
    assert docs[0].error_class == pb.ERROR_CLASS_RETRYABLE and "gave up" in docs[0].error_message


async def test_stalled_documents_are_visible_and_retryable(harness):
    session = (await harness.create([mfile("a.pdf"), mfile("b.pdf")])).session
    messages = await harness.dispatch()
    await harness.started(messages[0])
    async with harness.pool.acquire() as conn:
        await conn.execute(
            "UPDATE session.session_documents SET updated_at = now() - interval '2 hours' "
            "WHERE document_id = $1",
            uuid.UUID(messages[0].payload.document_id),
        )
    s = await get(harness, session.session_id)
    assert s.counts.stalled == 1
    stalled = (
        await harness.operator.ListSessionDocuments(
            pb.ListSessionDocumentsRequest(session_id=session.session_id, stalled=True)
        )
    ).documents
    assert [d.document_id for d in stalled] == [messages[0].payload.document_id] and stalled[
        0
    ].stalled
    retry = await harness.operator.RetryDocuments(
        pb.RetryDocumentsRequest(session_id=session.session_id, stalled=True)
    )
    assert retry.retried == 1
    [again] = await harness.dispatch()
    assert (
        again.payload.document_id == messages[0].payload.document_id and again.payload.attempt == 2
    )


async def test_pause_resume(harness):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(4)], max_in_flight=2)).session
    queued = await harness.dispatch()
    await harness.started(queued[0])
    paused = (
        await harness.operator.PauseSession(pb.PauseSessionRequest(session_id=session.session_id))
    ).session
    assert paused.state == pb.SESSION_STATE_PAUSED
    # a queued message starting now is refused and its document goes back to pending
    assert not (await harness.started(queued[1])).proceed
    # the running one finishes normally
    assert (await harness.result(queued[0])).document_state == pb.DOCUMENT_STATE_PENDING
    assert await harness.dispatch() == []
    s = await get(harness, session.session_id)
    assert s.counts.pending == 4 and s.counts.queued == 0
    resumed = (
        await harness.operator.ResumeSession(pb.ResumeSessionRequest(session_id=session.session_id))
    ).session
    assert resumed.state == pb.SESSION_STATE_RUNNING
    again = await harness.dispatch()
    assert len(again) == 2 and again[0].payload.stage == "chunk"
    for m in again:
        await harness.result(m)
    assert (await harness.run_to_end(session.session_id)).state == pb.SESSION_STATE_COMPLETED


async def test_a_start_reported_late_runs_on_while_paused_and_a_result_alone_dates_its_run(
    harness,
):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(4)], max_in_flight=4)).session
    queued = await harness.dispatch()
    assert len(queued) == 4
    await harness.operator.PauseSession(pb.PauseSessionRequest(session_id=session.session_id))
    began = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2)
    # a worker that began before the pause and reports its start late: the run goes on
    late = await harness.started(queued[0], began=began)
    assert late.proceed and late.lease_expires_at.seconds > 0
    # a start reported before working is refused, as before
    assert not (await harness.started(queued[1])).proceed

    async def run_of(m) -> pb.StageRun:
        doc = (
            await harness.operator.GetDocument(
                pb.GetDocumentRequest(document_id=m.payload.document_id)
            )
        ).document
        (run,) = [r for r in doc.stage_runs if r.attempt == m.payload.attempt]
        return run

    running = await run_of(queued[0])
    assert running.state == pb.STAGE_RUN_STATE_RUNNING and running.worker == "w1"
    assert abs(running.started_at.ToDatetime(dt.UTC) - began) < dt.timedelta(milliseconds=1)
    assert (await harness.result(queued[0])).document_state == pb.DOCUMENT_STATE_PENDING
    # a short run reports only its result: it began its duration before it finished
    assert (await harness.result(queued[2], duration=1.5)).document_state == (
        pb.DOCUMENT_STATE_PENDING
    )
    short = await run_of(queued[2])
    assert short.state == pb.STAGE_RUN_STATE_SUCCEEDED
    took = short.finished_at.ToDatetime(dt.UTC) - short.started_at.ToDatetime(dt.UTC)
    assert abs(took - dt.timedelta(seconds=1.5)) < dt.timedelta(milliseconds=1)
    # once the session is cancelled, a late start is refused: the worker stops the run
    await harness.operator.CancelSession(pb.CancelSessionRequest(session_id=session.session_id))
    assert not (await harness.started(queued[3], began=began)).proceed
    assert (await run_of(queued[3])).state == pb.STAGE_RUN_STATE_CANCELLED


async def test_cancel(harness):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(5)], max_in_flight=2)).session
    queued = await harness.dispatch()
    await harness.started(queued[0])
    cancelled = (
        await harness.operator.CancelSession(pb.CancelSessionRequest(session_id=session.session_id))
    ).session
    assert cancelled.state == pb.SESSION_STATE_CANCELLED
    assert cancelled.counts.cancelled == 5 and cancelled.counts.pending == 0
    assert not (await harness.started(queued[1])).proceed
    # the run under way when it was cancelled: its result is refused, what it cost is kept
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await harness.result(queued[0], cost="0.0015", charge=True)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cancelled" in late.value.details()
    s = await get(harness, session.session_id)
    assert Decimal(s.cost_so_far.amount) == Decimal("0.0015")
    assert await harness.dispatch() == []
    for call in (
        harness.operator.ResumeSession(pb.ResumeSessionRequest(session_id=session.session_id)),
        harness.operator.RetryDocuments(
            pb.RetryDocumentsRequest(session_id=session.session_id, failed=True)
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # cancelling again is a no-op
    again = await harness.operator.CancelSession(
        pb.CancelSessionRequest(session_id=session.session_id)
    )
    assert again.session.state == pb.SESSION_STATE_CANCELLED


async def test_lifecycle_preconditions(harness):
    session = (await harness.create(start=False)).session
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.operator.PauseSession(pb.PauseSessionRequest(session_id=session.session_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    started = await harness.operator.StartSession(
        pb.StartSessionRequest(session_id=session.session_id)
    )
    assert started.session.state == pb.SESSION_STATE_RUNNING
    again = await harness.operator.StartSession(
        pb.StartSessionRequest(session_id=session.session_id)
    )
    assert again.session.state == pb.SESSION_STATE_RUNNING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.operator.StartSession(pb.StartSessionRequest(session_id=str(uuid.uuid4())))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.operator.GetSession(pb.GetSessionRequest(session_id="nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_retry_failed_documents(harness):
    session = (
        await harness.create([mfile("a.pdf"), mfile("b.pdf"), mfile("c.pdf", problem="corrupt")])
    ).session
    a, b = await harness.dispatch()
    await harness.result(a, ok=False, error_class=pb.ERROR_CLASS_PERMANENT, message_text="bad")
    tune(harness, max_attempts=1)
    await harness.result(b, ok=False, error_class=pb.ERROR_CLASS_RETRYABLE, message_text="flaky")
    s = await get(harness, session.session_id)
    assert s.state == pb.SESSION_STATE_COMPLETED_WITH_ERRORS and s.counts.failed == 3
    retry = await harness.operator.RetryDocuments(
        pb.RetryDocumentsRequest(session_id=session.session_id, failed=True)
    )
    assert retry.retried == 1 and retry.session.state == pb.SESSION_STATE_RUNNING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.operator.RetryDocuments(
            pb.RetryDocumentsRequest(
                session_id=session.session_id, document_ids=[a.payload.document_id]
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    forced = await harness.operator.RetryDocuments(
        pb.RetryDocumentsRequest(
            session_id=session.session_id, document_ids=[a.payload.document_id], force=True
        )
    )
    assert forced.retried == 1
    tune(harness, max_attempts=3)
    final = await harness.run_to_end(session.session_id)
    assert final.counts.completed == 2 and final.counts.failed == 1
    assert final.state == pb.SESSION_STATE_COMPLETED_WITH_ERRORS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.operator.RetryDocuments(
            pb.RetryDocumentsRequest(session_id=session.session_id)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def budget(harness, session_id: str) -> cpb.Budget:
    return (await harness.cost.GetBudget(cpb.GetBudgetRequest(session_id=session_id))).budget


async def test_budget_admits_documents_and_settles_them(harness):
    files = [mfile(f"{i}.pdf", estimated="0.01") for i in range(10)]
    session = (await harness.create(files, budget="0.035", max_in_flight=10)).session
    assert Decimal((await budget(harness, session.session_id)).limit.amount) == Decimal("0.035")
    messages = await harness.dispatch()
    assert len(messages) == 3  # three documents fit; their whole estimate is reserved
    s = await get(harness, session.session_id)
    assert s.state == pb.SESSION_STATE_BUDGET_EXHAUSTED and "budget" in s.state_reason
    assert Decimal((await budget(harness, session.session_id)).reserved.amount) == Decimal("0.03")
    # admitted documents go through every stage on their reservation
    for _stage in range(3):
        for m in messages:
            await harness.result(m, cost="0.0015", charge=True)
            if _stage < 2:  # not done yet: charged at once, held only for the rest of it
                b = await budget(harness, session.session_id)
                assert Decimal(b.spent.amount) + Decimal(b.reserved.amount) == Decimal("0.03")
        messages = await harness.dispatch()
        if _stage < 2:
            assert len(messages) == 3 and messages[0].payload.stage != "extract"
    assert messages == []
    await harness.server.servicer.drain()
    b = await budget(harness, session.session_id)
    assert Decimal(b.spent.amount) == Decimal("0.0135") and Decimal(b.reserved.amount) == 0
    s = await get(harness, session.session_id)
    assert s.counts.completed == 3 and s.counts.pending == 7
    # the spare budget (0.0215) admits two more documents when the reconciler looks again
    await harness.reconciler.run_once()
    s = await get(harness, session.session_id)
    assert s.state == pb.SESSION_STATE_RUNNING and "budget raised" in s.state_reason
    more = await harness.dispatch()
    assert len(more) == 2
    assert (await get(harness, session.session_id)).state == pb.SESSION_STATE_BUDGET_EXHAUSTED
    for m in more:
        await harness.result(m, cost="0.0015", charge=True)
    # raising the budget lets the rest through
    await harness.cost.SetBudget(
        cpb.SetBudgetRequest(session_id=session.session_id, limit=convert.money("10"))
    )
    await harness.reconciler.run_once()
    final = await harness.run_to_end(session.session_id, rounds=50)
    assert final.state == pb.SESSION_STATE_COMPLETED and final.counts.completed == 10
    await harness.server.servicer.drain()
    b = await budget(harness, session.session_id)
    assert Decimal(b.reserved.amount) == 0


async def test_cancel_releases_reservations(harness):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(4)], budget="5")).session
    assert len(await harness.dispatch()) == 4
    assert Decimal((await budget(harness, session.session_id)).reserved.amount) == Decimal("0.04")
    await harness.operator.CancelSession(pb.CancelSessionRequest(session_id=session.session_id))
    b = await budget(harness, session.session_id)
    assert Decimal(b.reserved.amount) == 0 and Decimal(b.spent.amount) == 0


async def test_budget_refused_outright(harness):
    session = (await harness.create([mfile("a.pdf", estimated="0.5")], budget="0.25")).session
    assert await harness.dispatch() == []
    s = await get(harness, session.session_id)
    assert s.state == pb.SESSION_STATE_BUDGET_EXHAUSTED and s.counts.pending == 1
    await harness.reconciler.run_once()
    assert (await get(harness, session.session_id)).state == pb.SESSION_STATE_BUDGET_EXHAUSTED
