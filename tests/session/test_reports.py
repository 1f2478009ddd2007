"""Stage reports: idempotent, monotonic, and the session finishes only when everything is terminal."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import grpc
import pytest
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.session.v1 import session_service_pb2 as pb
from google.protobuf import duration_pb2

from services.session import states as st

from .helpers import mfile, tune, work, work_to_end


async def event_count(harness, session_id: str) -> int:
    async with harness.pool.acquire() as conn:
        return await conn.fetchval(
            "SELECT count(*) FROM session.session_events WHERE session_id = $1",
            uuid.UUID(session_id),
        )


async def get(harness, session_id: str) -> pb.Session:
    return (await harness.operator.GetSession(pb.GetSessionRequest(session_id=session_id))).session


async def document(harness, document_id: str) -> pb.Document:
    return (
        await harness.operator.GetDocument(pb.GetDocumentRequest(document_id=document_id))
    ).document


def test_state_machine_tables_are_monotonic():
    for old in st.DOC_TERMINAL - {st.FAILED}:
        assert st.DOC_TRANSITIONS[old] == frozenset()
    assert st.FAILED not in st.DOC_TRANSITIONS[st.COMPLETED]
    assert not st.doc_may(st.COMPLETED, st.RUNNING)
    assert not st.doc_may(st.RUNNING, st.QUEUED)
    for old in (st.RUN_SUCCEEDED, st.RUN_FAILED, st.RUN_EXPIRED, st.RUN_CANCELLED):
        assert st.RUN_TRANSITIONS[old] == frozenset()
    assert not st.session_may(st.S_COMPLETED, st.S_RUNNING)
    assert not st.session_may(st.S_CANCELLED, st.S_RUNNING)


async def test_a_document_goes_through_every_stage(harness):
    session = (await harness.create([mfile("a.pdf")])).session
    for stage in ("extract", "chunk", "entities"):
        [m] = await harness.dispatch()
        assert m.payload.stage == stage and m.payload.attempt == 1
        started = await harness.started(m)
        assert started.proceed and started.lease_expires_at.seconds > 0
        assert (await document(harness, m.payload.document_id)).state == pb.DOCUMENT_STATE_RUNNING
        result = await harness.result(m, cost="0.0015")
        assert not result.replayed
    assert result.document_state == pb.DOCUMENT_STATE_COMPLETED
    doc = await document(harness, m.payload.document_id)
    assert [r.stage for r in doc.stage_runs] == [
        common_pb2.STAGE_EXTRACT,
        common_pb2.STAGE_CHUNK,
        common_pb2.STAGE_ENTITIES,
    ]
    assert all(r.state == pb.STAGE_RUN_STATE_SUCCEEDED for r in doc.stage_runs)
    assert doc.cost.amount == "0.0045"
    final = await get(harness, session.session_id)
    assert final.state == pb.SESSION_STATE_COMPLETED
    assert [(s.succeeded, s.queued) for s in final.stages] == [(1, 0)] * 3


async def test_duplicate_and_late_reports_change_nothing(harness):
    session = (await harness.create([mfile("a.pdf"), mfile("b.pdf")])).session
    first = await harness.dispatch()
    m = first[0]
    await harness.started(m)
    assert (await harness.result(m)).document_state == pb.DOCUMENT_STATE_PENDING  # waits for chunk
    events = await event_count(harness, session.session_id)
    # the same report again: a replay
    again = await harness.result(m)
    assert again.replayed and again.document_state == pb.DOCUMENT_STATE_PENDING
    # a different verdict for the same attempt is a replay too: the first one stands
    late_failure = await harness.result(
        m, ok=False, error_class=pb.ERROR_CLASS_PERMANENT, message_text="boom"
    )
    assert late_failure.replayed
    # a late start of a finished run: not wanted
    assert not (await harness.started(m)).proceed
    assert await event_count(harness, session.session_id) == events
    doc = await document(harness, m.payload.document_id)
    assert doc.state == pb.DOCUMENT_STATE_PENDING and doc.stage == common_pb2.STAGE_CHUNK
    assert doc.error_message == ""


async def test_result_without_start_report_is_accepted(harness):
    await harness.create([mfile("a.pdf")])
    [m] = await harness.dispatch()
    assert (await harness.result(m)).document_state == pb.DOCUMENT_STATE_PENDING


async def test_session_is_never_completed_while_documents_are_queued(harness):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(4)])).session
    messages = await harness.dispatch()
    assert len(messages) == 4
    assert (await get(harness, session.session_id)).state == pb.SESSION_STATE_RUNNING
    for m in messages[:3]:
        await harness.result(
            m, ok=False, error_class=pb.ERROR_CLASS_PERMANENT, message_text="corrupt"
        )
    s = await get(harness, session.session_id)
    assert s.state == pb.SESSION_STATE_RUNNING and s.counts.queued == 1 and s.counts.failed == 3
    await harness.result(
        messages[3], ok=False, error_class=pb.ERROR_CLASS_PERMANENT, message_text="x"
    )
    s = await get(harness, session.session_id)
    assert s.state == pb.SESSION_STATE_COMPLETED_WITH_ERRORS and s.finished_at.seconds > 0


async def test_permanent_failure_fails_at_once_and_keeps_its_reason(harness):
    await harness.create([mfile("a.pdf")])
    [m] = await harness.dispatch()
    r = await harness.result(
        m,
        ok=False,
        error_class=pb.ERROR_CLASS_PERMANENT,
        message_text="the PDF is encrypted",
        code="encrypted",
    )
    assert r.document_state == pb.DOCUMENT_STATE_FAILED
    doc = await document(harness, m.payload.document_id)
    assert (
        doc.error_class == pb.ERROR_CLASS_PERMANENT and doc.error_message == "the PDF is encrypted"
    )
    assert doc.stage_runs[0].error_code == "encrypted"
    assert await harness.dispatch() == []


async def test_retryable_failures_back_off_then_give_up(harness):
    tune(harness, max_attempts=3)
    session = (await harness.create([mfile("a.pdf")])).session
    for attempt in (1, 2, 3):
        [m] = await harness.dispatch()
        assert m.payload.attempt == attempt and m.payload.stage == "extract"
        await harness.started(m)
        r = await harness.result(
            m, ok=False, error_class=pb.ERROR_CLASS_RETRYABLE, message_text="OCR engine timed out"
        )
    assert r.document_state == pb.DOCUMENT_STATE_FAILED
    doc = await document(harness, m.payload.document_id)
    assert (
        doc.error_class == pb.ERROR_CLASS_RETRYABLE
        and "gave up after 3 attempts" in doc.error_message
    )
    assert [run.attempt for run in doc.stage_runs] == [1, 2, 3]
    assert (await get(harness, session.session_id)).state == pb.SESSION_STATE_COMPLETED_WITH_ERRORS


async def test_backoff_delays_the_next_attempt(harness):
    tune(harness, retry_backoff_base=30.0)
    await harness.create([mfile("a.pdf")])
    [m] = await harness.dispatch()
    r = await harness.result(
        m, ok=False, error_class=pb.ERROR_CLASS_RETRYABLE, message_text="try later"
    )
    assert r.document_state == pb.DOCUMENT_STATE_PENDING
    assert await harness.dispatch() == []  # not before 30 s
    async with harness.pool.acquire() as conn:
        delay = await conn.fetchval(
            "SELECT extract(epoch FROM not_before - now()) FROM session.session_documents WHERE document_id = $1",
            uuid.UUID(m.payload.document_id),
        )
        assert 25 < delay <= 30
        await conn.execute(
            "UPDATE session.session_documents SET not_before = now() - interval '1 s'"
        )
    [again] = await harness.dispatch()
    assert again.payload.attempt == 2


async def test_concurrent_reports_are_batched_and_exact(harness):
    n = 200
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(n)], max_in_flight=n)).session
    messages = await harness.dispatch()
    assert len(messages) == n
    started = await asyncio.gather(*(harness.started(m) for m in messages))
    assert all(s.proceed for s in started)
    results = await asyncio.gather(
        *(harness.result(m) for m in messages), *(harness.result(m) for m in messages[:50])
    )
    assert sum(r.replayed for r in results) == 50
    s = await get(harness, session.session_id)
    assert s.counts.pending == n and s.counts.running == 0
    assert s.stages[0].succeeded == n
    async with harness.pool.acquire() as conn:
        seqs = await conn.fetch(
            "SELECT seq FROM session.session_events WHERE session_id = $1 ORDER BY seq",
            uuid.UUID(session.session_id),
        )
    assert [r["seq"] for r in seqs] == list(range(1, len(seqs) + 1))
    assert seqs[-1]["seq"] == s.last_seq


async def test_report_errors_have_precise_codes(harness):
    await harness.create([mfile("a.pdf")])
    [m] = await harness.dispatch()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.worker.ReportStageResult(
            pb.ReportStageResultRequest(
                document_id=m.payload.document_id,
                stage=common_pb2.STAGE_EXTRACT,
                attempt=7,
                task_id=m.task_id,
                succeeded=True,
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # a report must say which task it comes from, and only the run's own task may report it
    for task_id, code in (("", grpc.StatusCode.INVALID_ARGUMENT),
                          ("another", grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await harness.worker.ReportStageResult(
                pb.ReportStageResultRequest(
                    document_id=m.payload.document_id, stage=common_pb2.STAGE_EXTRACT,
                    attempt=1, task_id=task_id, succeeded=True,
                )
            )
        assert err.value.code() == code, task_id
    doc = await document(harness, m.payload.document_id)
    assert doc.state == pb.DOCUMENT_STATE_QUEUED  # nothing changed
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.result(m, ok=False, error_class=0, message_text="")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.worker.ReportStageStarted(
            pb.ReportStageStartedRequest(document_id="x", attempt=0)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # a start report carrying another task id is not the live run
    bad = await harness.worker.ReportStageStarted(
        pb.ReportStageStartedRequest(
            document_id=m.payload.document_id,
            stage=common_pb2.STAGE_EXTRACT,
            attempt=1,
            task_id="other",
        )
    )
    assert not bad.proceed


async def test_a_redelivered_message_may_go_on(harness):
    await harness.create([mfile("a.pdf")])
    [m] = await harness.dispatch()
    first = await harness.started(m, worker="w1")
    again = await harness.started(m, worker="w2")  # the first worker died; Celery redelivered
    assert first.proceed and again.proceed
    assert again.lease_expires_at.ToDatetime() >= first.lease_expires_at.ToDatetime()
    doc = await document(harness, m.payload.document_id)
    assert doc.stage_runs[0].worker == "w2"


async def test_every_event_follows_the_state_machine_and_counters_match(harness):
    """The report statements implement the transitions in SQL: check them against `states`."""
    tune(harness, max_attempts=2)
    a = (await harness.create([mfile(f"a{i}.pdf") for i in range(8)], max_in_flight=8)).session
    b = (await harness.create([mfile(f"b{i}.pdf") for i in range(4)], max_in_flight=4)).session
    messages = await harness.dispatch()
    for i, m in enumerate(messages):
        if i % 4 == 0:
            await harness.result(
                m, ok=False, error_class=pb.ERROR_CLASS_RETRYABLE, message_text="flaky"
            )
        elif i % 4 == 1:
            await harness.result(
                m, ok=False, error_class=pb.ERROR_CLASS_PERMANENT, message_text="bad"
            )
        elif i % 4 == 2:
            await harness.started(m)
        else:
            await harness.result(m)
            await harness.result(m)
    await harness.operator.PauseSession(pb.PauseSessionRequest(session_id=b.session_id))
    for m in await harness.dispatch():
        await harness.started(m)
    async with harness.pool.acquire() as conn:
        await conn.execute(
            "UPDATE session.stage_runs SET lease_expires_at = now() - interval '1 s' "
            "WHERE state IN ('queued', 'running')"
        )
    await harness.reconciler.run_once()
    await harness.operator.CancelSession(pb.CancelSessionRequest(session_id=b.session_id))
    await harness.run_to_end(a.session_id, rounds=30)
    async with harness.pool.acquire() as conn:
        events = await conn.fetch(
            "SELECT session_id, seq, kind, payload FROM session.session_events "
            "ORDER BY session_id, seq"
        )
        sessions = await conn.fetch("SELECT * FROM session.import_sessions")
        recount = await conn.fetch(
            "SELECT session_id, state, count(*) AS n FROM session.session_documents "
            "GROUP BY session_id, state"
        )
    by_session: dict = {}
    for e in events:
        by_session.setdefault(e["session_id"], []).append(e["seq"])
        if e["kind"] == "document":
            p = e["payload"]
            assert st.doc_may(p["prev"], p["state"]), p
    for row in sessions:
        assert by_session[row["session_id"]] == list(range(1, row["last_seq"] + 1))
        counted = {r["state"]: r["n"] for r in recount if r["session_id"] == row["session_id"]}
        for state in st.DOCUMENT_STATES:
            assert row[f"count_{state}"] == counted.get(state, 0), (state, row, counted)
    final = {r["session_id"]: r["state"] for r in sessions}
    assert final[uuid.UUID(a.session_id)] == st.S_WITH_ERRORS
    assert final[uuid.UUID(b.session_id)] == st.S_CANCELLED


async def test_cost_so_far_is_reused_for_a_moment_while_live_and_final_when_done(
    harness, tmp_path
):
    session = (await harness.create([mfile("a.pdf"), mfile("b.pdf")])).session
    sid = session.session_id
    first, second = await harness.dispatch()
    await work(harness, first, tmp_path)
    tune(harness, cost_cache_seconds=0.0)
    seen = Decimal((await get(harness, sid)).cost_so_far.amount)
    assert seen > 0
    tune(harness, cost_cache_seconds=60.0)
    await work(harness, second, tmp_path)
    # live: the figure read a moment ago is reused
    assert Decimal((await get(harness, sid)).cost_so_far.amount) == seen
    tune(harness, cost_cache_seconds=0.0)
    assert Decimal((await get(harness, sid)).cost_so_far.amount) == 2 * seen
    tune(harness, cost_cache_seconds=60.0)
    final = await work_to_end(harness, sid, tmp_path)
    assert final.state == pb.SESSION_STATE_COMPLETED
    ledger = await harness.cost.GetSessionCosts(cpb.GetSessionCostsRequest(session_id=sid))
    # finished: always the ledger's final figure, whatever was read before
    assert Decimal(final.cost_so_far.amount) == Decimal(ledger.actual_total.amount) == 6 * seen


def result_request(m, **fields) -> pb.ReportStageResultRequest:
    p = m.payload
    key = {"document_id": p.document_id, "stage": common_pb2.STAGE_EXTRACT, "attempt": p.attempt}
    return pb.ReportStageResultRequest(
        **{"task_id": m.task_id, "worker": "w1", **key, "succeeded": True, **fields}
    )


async def test_several_results_in_one_call_are_answered_each_on_its_own(harness):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(3)], max_in_flight=3)).session
    a, b, c = await harness.dispatch()
    failed = result_request(
        b,
        succeeded=False,
        error_class=pb.ERROR_CLASS_PERMANENT,
        error_code="corrupt",
        error_message="not a PDF",
    )
    unknown = result_request(c, attempt=9)
    invalid = result_request(c, succeeded=False)  # a failure without its class or message
    response = await harness.worker.ReportStageResults(
        pb.ReportStageResultsRequest(reports=[result_request(a), failed, unknown, invalid])
    )
    codes = [grpc.StatusCode.OK.value[0], grpc.StatusCode.OK.value[0]]
    codes += [grpc.StatusCode.NOT_FOUND.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert [answer.code for answer in response.answers] == codes
    assert "error_class" in response.answers[3].message
    assert not response.answers[2].HasField("result")
    assert response.answers[0].result.document_state == pb.DOCUMENT_STATE_PENDING  # next stage
    assert response.answers[1].result.document_state == pb.DOCUMENT_STATE_FAILED
    s = await get(harness, session.session_id)
    assert s.stages[0].succeeded == 1 and s.counts.failed == 1 and s.counts.queued == 1
    # the same call again is a replay of the two it applied
    again = await harness.worker.ReportStageResults(
        pb.ReportStageResultsRequest(reports=[result_request(a), failed])
    )
    assert [answer.result.replayed for answer in again.answers] == [True, True]
    # c's run is still live: its own report goes through
    [alone] = (
        await harness.worker.ReportStageResults(
            pb.ReportStageResultsRequest(reports=[result_request(c)])
        )
    ).answers
    assert alone.code == 0 and not alone.result.replayed


async def test_a_results_call_needs_one_to_a_hundred_reports_and_the_worker_scope(harness):
    await harness.create([mfile("a.pdf")])
    [m] = await harness.dispatch()
    for reports in ([], [result_request(m)] * 101):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await harness.worker.ReportStageResults(pb.ReportStageResultsRequest(reports=reports))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.operator.ReportStageResults(
            pb.ReportStageResultsRequest(reports=[result_request(m)])
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_late_result_of_a_lost_run_is_refused_but_its_cost_is_kept(harness):
    """A run expired while its worker still had it: its result is not applied, but what it was
    charged is on the run, its document and its session (the money was spent)."""
    session = (await harness.create([mfile("a.pdf")])).session
    [m] = await harness.dispatch()
    await harness.started(m)
    async with harness.pool.acquire() as conn:
        await conn.execute("UPDATE session.stage_runs SET lease_expires_at = now() - interval '1 s'")
    await harness.reconciler.run_once()
    [again] = await harness.dispatch()
    assert again.payload.attempt == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.result(m, cost="0.003")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in err.value.details() and "cost was recorded" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError):  # a replay adds nothing
        await harness.result(m, cost="0.003")
    await harness.result(again, cost="0.001")
    doc = await document(harness, m.payload.document_id)
    costs = {r.attempt: Decimal(r.cost.amount) for r in doc.stage_runs if r.stage == 1}
    assert costs == {1: Decimal("0.003"), 2: Decimal("0.001")}
    assert Decimal(doc.cost.amount) == Decimal("0.004")
    async with harness.pool.acquire() as conn:
        reported = await conn.fetchval(
            "SELECT reported_cost FROM session.import_sessions WHERE session_id = $1",
            uuid.UUID(session.session_id),
        )
    assert reported == Decimal("0.004")
    s = (await harness.operator.GetSession(pb.GetSessionRequest(session_id=session.session_id))).session
    assert Decimal(s.wasted_cost.amount) == Decimal("0.003")


async def test_a_bad_report_of_a_batch_fails_alone_and_the_good_ones_are_applied(harness):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(5)], max_in_flight=5)).session
    a, b, c, d, e = await harness.dispatch()
    bad = [
        result_request(b, worker="w\x00"),  # Postgres text cannot hold a NUL
        result_request(c, stage=-3),  # a stage the enum does not define
        result_request(d, duration=duration_pb2.Duration(seconds=10**11)),  # beyond the run's column
        result_request(e, cost=common_pb2.Money(amount="1e30")),  # beyond any amount
    ]
    response = await harness.worker.ReportStageResults(
        pb.ReportStageResultsRequest(reports=[result_request(a), *bad])
    )
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [answer.code for answer in response.answers] == [0, invalid, invalid, invalid, invalid]
    for answer, field in zip(response.answers[1:], ("worker", "stage", "duration", "cost"), strict=True):
        assert answer.message.startswith(field) and not answer.HasField("result")
    assert response.answers[0].result.document_state == pb.DOCUMENT_STATE_PENDING
    s = await get(harness, session.session_id)
    assert s.stages[0].succeeded == 1 and s.counts.queued == 4
    # Each bad run is still live: its corrected report goes through.
    fixed = await harness.worker.ReportStageResults(
        pb.ReportStageResultsRequest(reports=[result_request(m) for m in (b, c, d, e)])
    )
    assert [answer.code for answer in fixed.answers] == [0] * 4
