"""VerifySession: PASS for a clean import, FAIL for what is missing or drifted."""

from __future__ import annotations

import uuid

from docimport.session.v1 import session_service_pb2 as pb

from .helpers import mfile, work, work_to_end


def sample_case():
    """The shape of examples/sample-case: 11 files, a duplicate, a corrupt and an encrypted PDF."""
    return [
        mfile("pleadings/complaint.pdf", pages=3),
        mfile("pleadings/answer.pdf", pages=2),
        mfile("discovery/interrogatories.docx", plan="docx"),
        mfile("discovery/scanned_deposition_excerpt.pdf", plan="ocr", pages=2, ocr_pages=2),
        mfile("discovery/site_photo.png", plan="image"),
        mfile("correspondence/letter_to_counsel.eml", plan="email"),
        mfile("correspondence/call_notes.txt", plan="text"),
        mfile("medical_records/er_visit_summary.pdf", pages=2),
        mfile(
            "medical_records/er_visit_summary_copy.pdf",
            duplicate_of="medical_records/er_visit_summary.pdf",
        ),
        mfile("medical_records/corrupt_scan.pdf", problem="corrupt"),
        mfile("medical_records/sealed_records.pdf", problem="encrypted"),
    ]


async def verify(harness, session_id: str, deep: bool = True) -> pb.VerifySessionResponse:
    return await harness.operator.VerifySession(
        pb.VerifySessionRequest(session_id=session_id, deep=deep)
    )


async def test_a_clean_import_passes(harness, tmp_path):
    session = (await harness.create(sample_case())).session
    final = await work_to_end(harness, session.session_id, tmp_path)
    assert final.state == pb.SESSION_STATE_COMPLETED_WITH_ERRORS
    report = await verify(harness, session.session_id)
    assert report.verdict == pb.VERDICT_PASS, report
    c = report.counts
    assert (c.manifest_files, c.completed, c.skipped, c.failed, c.unaccounted) == (11, 8, 1, 2, 0)
    codes = {f.code: f for f in report.findings}
    assert codes["input_problem"].severity == pb.SEVERITY_INFO and codes["input_problem"].count == 2
    assert (
        "corrupt: 1" in codes["input_problem"].message
        and "encrypted: 1" in codes["input_problem"].message
    )
    assert codes["duplicates"].count == 1
    assert "processable_completion" in codes
    assert round(report.completeness_percent, 2) == round(100 * 9 / 11, 2)
    assert report.actual_cost.amount and report.actual_cost.amount != "0"


async def test_missing_artifacts_and_costs_fail(harness, tmp_path):
    session = (await harness.create([mfile("a.pdf"), mfile("b.pdf")])).session
    messages = await harness.dispatch()
    await work(harness, messages[0], tmp_path, record_cost=False)
    await work(harness, messages[1], tmp_path)
    await work_to_end(harness, session.session_id, tmp_path)
    victim = next(tmp_path.glob(f"{messages[1].payload.document_id}.*"))
    victim.write_bytes(b"tampered")
    report = await verify(harness, session.session_id)
    assert report.verdict == pb.VERDICT_FAIL
    codes = {f.code: f for f in report.findings}
    assert codes["missing_cost_events"].document_ids == [messages[0].payload.document_id]
    assert codes["artifact_size_mismatch"].document_ids == [messages[1].payload.document_id]
    assert any("retry" in r for r in report.recommendations)


async def test_counter_drift_fails(harness, tmp_path):
    session = (await harness.create([mfile("a.pdf")])).session
    await work_to_end(harness, session.session_id, tmp_path)
    async with harness.pool.acquire() as conn:
        await conn.execute(
            "UPDATE session.import_sessions SET count_completed = count_completed + 1"
        )
    report = await verify(harness, session.session_id)
    assert report.verdict == pb.VERDICT_FAIL
    assert any(f.code == "counter_drift" for f in report.findings)


async def test_stage_count_drift_fails(harness, tmp_path):
    session = (await harness.create([mfile("a.pdf")])).session
    await work_to_end(harness, session.session_id, tmp_path)
    await harness.store.fold_stage_counts()
    async with harness.pool.acquire() as conn:
        await conn.execute(
            "UPDATE session.stage_counts SET succeeded = succeeded + 1 WHERE stage = 'chunk'"
        )
    report = await verify(harness, session.session_id)
    assert report.verdict == pb.VERDICT_FAIL
    [drift] = [f for f in report.findings if f.code == "counter_drift"]
    assert "chunk succeeded: stored 2, recounted 1" in drift.message


async def test_a_running_session_warns(harness, tmp_path):
    session = (await harness.create([mfile("a.pdf"), mfile("b.pdf")])).session
    [m, _] = await harness.dispatch()
    await work(harness, m, tmp_path)
    report = await verify(harness, session.session_id)
    assert report.verdict == pb.VERDICT_FAIL  # 0 of 2 completed is below 90%
    assert report.counts.in_progress == 2
    assert any("verify again" in r for r in report.recommendations)


async def test_unaccounted_manifest_files_fail(harness, tmp_path):
    files = [mfile("a.pdf"), mfile("b.pdf")]
    session = (await harness.create(files)).session
    await work_to_end(harness, session.session_id, tmp_path)
    # the manifest now lists a file the session never saw
    harness.manifests.manifests[session.manifest_id][1].append(mfile("c.pdf"))
    report = await verify(harness, session.session_id)
    assert report.verdict == pb.VERDICT_FAIL and report.counts.unaccounted == 1
    async with harness.pool.acquire() as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM session.session_documents WHERE session_id = $1",
                uuid.UUID(session.session_id),
            )
            == 2
        )


async def test_money_that_disagrees_fails_naming_every_figure(harness, tmp_path):
    """One money truth: a run whose cost is not what the ledger charged it, and a ledger that
    holds more than the session's cost (a charge the session never heard of), fail."""
    from decimal import Decimal

    session = (await harness.create([mfile("a.pdf")], budget="5")).session
    final = await work_to_end(harness, session.session_id, tmp_path)
    assert final.state == pb.SESSION_STATE_COMPLETED
    assert (await verify(harness, session.session_id)).verdict == pb.VERDICT_PASS
    async with harness.pool.acquire() as conn:
        await conn.execute(
            "UPDATE session.stage_runs SET cost = cost + 0.001 WHERE stage = 'chunk'"
        )
    report = await verify(harness, session.session_id)
    assert report.verdict == pb.VERDICT_FAIL
    codes = {f.code: f for f in report.findings}
    assert "run_cost_mismatch" in codes
    async with harness.pool.acquire() as conn:
        await conn.execute(
            "UPDATE session.stage_runs SET cost = cost - 0.001 WHERE stage = 'chunk'"
        )
    assert (await verify(harness, session.session_id)).verdict == pb.VERDICT_PASS
    # a charge of a run the session service never heard of (a service-scope caller's)
    from docimport.common.v1 import common_pb2
    from docimport.cost.v1 import cost_service_pb2 as cpb

    await harness.cost_as_service().RecordCosts(cpb.RecordCostsRequest(events=[cpb.CostEvent(
        session_id=session.session_id, document_id=str(uuid.uuid4()),
        stage=common_pb2.STAGE_EXTRACT, attempt=9, service="aws_textract",
        operation="ocr_page", units="1", kind=cpb.COST_KIND_ACTUAL)]))
    report = await verify(harness, session.session_id)
    assert report.verdict == pb.VERDICT_FAIL
    [mismatch] = [f for f in report.findings if f.code == "cost_mismatch"]
    for name in ("the ledger", "the session's cost", "the budget's spent amount"):
        assert name in mismatch.message
    assert Decimal(report.actual_cost.amount) > 0


async def test_a_succeeded_run_without_an_artifact_fails(harness, tmp_path):
    session = (await harness.create([mfile("a.pdf"), mfile("b.pdf")])).session
    await work_to_end(harness, session.session_id, tmp_path)
    async with harness.pool.acquire() as conn:
        document_id = await conn.fetchval(
            "UPDATE session.stage_runs SET artifacts = '[]'::jsonb"
            " WHERE stage = 'chunk' AND ctid = (SELECT ctid FROM session.stage_runs"
            " WHERE stage = 'chunk' LIMIT 1) RETURNING document_id"
        )
    report = await verify(harness, session.session_id)
    assert report.verdict == pb.VERDICT_FAIL
    [finding] = [f for f in report.findings if f.code == "run_without_artifact"]
    assert finding.document_ids == [str(document_id)]
