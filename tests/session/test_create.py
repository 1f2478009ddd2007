"""CreateSession: idempotency, projects, dry runs, how manifest files become documents."""

from __future__ import annotations

import uuid
from decimal import Decimal

import grpc
import pytest
from conftest import TOKENS
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2 as pb
from google.rpc import error_details_pb2

from services.common import convert
from services.common.channels import aio_channel
from services.common.config import ClientSettings
from services.common.errors import InvalidArgument, NotFound, Unavailable, details_of
from services.session.peers import CostPeer, ManifestPeer

from .helpers import mfile

SESSION_TABLES = (
    "projects",
    "import_sessions",
    "session_documents",
    "stage_runs",
    "session_events",
)


async def table_counts(pool) -> dict[str, int]:
    async with pool.acquire() as conn:
        return {t: await conn.fetchval(f"SELECT count(*) FROM session.{t}") for t in SESSION_TABLES}


async def test_create_is_idempotent_by_request_id(harness):
    manifest_id = harness.manifests.add([mfile(f"a/{i}.pdf") for i in range(5)])
    first = await harness.create(manifest_id=manifest_id, request_id="req-1")
    again = await harness.create(manifest_id=manifest_id, request_id="req-1")
    assert again.session.session_id == first.session.session_id
    counts = await table_counts(harness.pool)
    assert counts["import_sessions"] == 1 and counts["session_documents"] == 5
    other = harness.manifests.add([mfile("b.pdf")])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.create(manifest_id=other, request_id="req-1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_concurrent_creates_with_one_request_id_make_one_session(harness):
    import asyncio

    manifest_id = harness.manifests.add([mfile(f"a/{i}.pdf") for i in range(50)])
    # each caller asks for another budget: the one stored first is the session's, and the only
    # one the cost service enforces (no side effect of the losers survives)
    results = await asyncio.gather(
        *(
            harness.create(manifest_id=manifest_id, request_id="same", budget=f"{i + 1}0")
            for i in range(5)
        ),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors  # every caller gets the answer, none ALREADY_EXISTS
    assert len({r.session.session_id for r in results}) == 1
    assert len({r.session.options.budget.amount for r in results}) == 1
    session = results[0].session
    counts = await table_counts(harness.pool)
    assert counts["import_sessions"] == 1 and counts["session_documents"] == 50
    budget = (
        await harness.cost.GetBudget(cpb.GetBudgetRequest(session_id=session.session_id))
    ).budget
    assert budget.limit.amount == session.options.budget.amount


async def test_projects_are_reused_never_duplicated(harness):
    a = await harness.create(project="Smith v. Jones")
    b = await harness.create(project="  smith V. JONES ")
    assert a.session.project.project_id == b.session.project.project_id
    assert b.session.project.name == "Smith v. Jones"
    by_id = await harness.operator.CreateSession(
        pb.CreateSessionRequest(
            request_id=str(uuid.uuid4()),
            manifest_id=harness.manifests.add([mfile("x.pdf")]),
            project_id=a.session.project.project_id,
        )
    )
    assert by_id.session.project.project_id == a.session.project.project_id
    assert (await table_counts(harness.pool))["projects"] == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.operator.CreateSession(
            pb.CreateSessionRequest(
                request_id=str(uuid.uuid4()),
                manifest_id=harness.manifests.add([mfile("y.pdf")]),
                project_id=str(uuid.uuid4()),
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_dry_run_plans_and_writes_nothing(harness):
    files = [
        mfile("pleadings/complaint.pdf", category="pleadings", priority=10, estimated="0.50"),
        mfile("medical/er.pdf", category="medical_records", priority=20, estimated="0.25"),
        mfile("medical/er_copy.pdf", category="medical_records", duplicate_of="medical/er.pdf"),
        mfile("medical/corrupt.pdf", category="medical_records", problem="corrupt"),
        mfile(
            "discovery/int.docx", category="discovery", priority=30, plan="docx", estimated="0.0015"
        ),
    ]
    manifest_id = harness.manifests.add(files)
    before = await table_counts(harness.pool)
    response = await harness.create(
        manifest_id=manifest_id,
        dry_run=True,
        budget="0.70",
        priority=["medical_records"],
        project="Brand New Project",
    )
    plan = response.plan
    assert not response.HasField("session")
    assert (plan.documents, plan.skipped, plan.problem_files) == (3, 1, 1)
    assert convert.parse_money(plan.estimated_cost, "x") == convert.parse_decimal("0.7515", "x")
    assert [c.category for c in plan.categories] == ["medical_records", "pleadings", "discovery"]
    assert [c.documents for c in plan.categories] == [1, 1, 1]
    assert plan.within_budget is False
    assert await table_counts(harness.pool) == before
    # nor a budget at the cost service
    async with harness.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM cost.budgets") == 0


async def test_manifest_files_become_documents_with_honest_states(harness):
    files = [
        mfile("pleadings/complaint.pdf"),
        mfile("medical/er.pdf"),
        mfile("medical/er_copy.pdf", duplicate_of="medical/er.pdf"),
        mfile("medical/corrupt_scan.pdf", problem="corrupt"),
        mfile("medical/sealed.pdf", problem="encrypted"),
        mfile("drafts/note.txt", plan="text", excluded="matches **/drafts/**"),
        mfile("mail/letter.eml/attachment-1.pdf", parent=str(uuid.uuid4())),
        mfile("video.mp4", plan="unsupported"),
    ]
    session = (await harness.create(files)).session
    c = session.counts
    assert (c.total, c.pending, c.skipped, c.failed) == (8, 2, 3, 3)
    docs = (
        await harness.operator.ListSessionDocuments(
            pb.ListSessionDocumentsRequest(session_id=session.session_id)
        )
    ).documents
    by_path = {d.relative_path: d for d in docs}
    assert by_path["medical/er_copy.pdf"].skip_reason == "duplicate of medical/er.pdf"
    assert by_path["drafts/note.txt"].skip_reason.startswith("excluded by the manifest")
    assert "attachment" in by_path["mail/letter.eml/attachment-1.pdf"].skip_reason
    corrupt = by_path["medical/corrupt_scan.pdf"]
    assert corrupt.state == pb.DOCUMENT_STATE_FAILED
    assert corrupt.error_class == pb.ERROR_CLASS_PERMANENT
    assert "corrupt" in corrupt.error_message
    assert by_path["video.mp4"].error_class == pb.ERROR_CLASS_PERMANENT
    # problem files are never dispatched
    messages = await harness.dispatch()
    assert sorted(m.payload.relative_path for m in messages) == [
        "medical/er.pdf",
        "pleadings/complaint.pdf",
    ]
    for m in messages:
        await harness.result(m)
    final = await harness.run_to_end(session.session_id)
    assert final.state == pb.SESSION_STATE_COMPLETED_WITH_ERRORS
    assert (final.counts.completed, final.counts.failed, final.counts.skipped) == (2, 3, 3)


async def test_a_session_with_nothing_to_do_finishes_when_started(harness):
    session = (
        await harness.create(
            [mfile("a.pdf", problem="empty"), mfile("b.pdf", duplicate_of="a.pdf")], start=False
        )
    ).session
    assert session.state == pb.SESSION_STATE_CREATED
    started = (
        await harness.operator.StartSession(pb.StartSessionRequest(session_id=session.session_id))
    ).session
    assert started.state == pb.SESSION_STATE_COMPLETED_WITH_ERRORS


async def test_large_manifest_is_read_page_by_page(harness):
    files = [mfile(f"bulk/{i:05d}.pdf") for i in range(2500)]
    session = (await harness.create(files)).session
    assert session.counts.total == 2500 and session.counts.pending == 2500
    assert harness.manifests.list_calls == 3  # 1000 per page


async def test_validation_and_precondition_errors(harness):
    stub = harness.operator
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateSession(
            pb.CreateSessionRequest(manifest_id="not-a-uuid", project_name=" ")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {
        v.field
        for d in details_of(err.value, error_details_pb2.BadRequest)
        for v in d.field_violations
    }
    assert fields == {"manifest_id", "project_name"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateSession(pb.CreateSessionRequest(manifest_id=str(uuid.uuid4())))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.create(manifest_id=str(uuid.uuid4()))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    scanning = harness.manifests.add([mfile("a.pdf")], state=mpb.MANIFEST_STATE_SCANNING)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.create(manifest_id=scanning)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.create(budget="-1")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def violated_fields(error: grpc.aio.AioRpcError) -> set[str]:
    return {v.field for d in details_of(error, error_details_pb2.BadRequest) for v in d.field_violations}


async def test_a_budget_beyond_the_largest_amount_names_the_request_field(harness):
    for budget in ("1e20", "1000000000000000"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await harness.create(budget=budget)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(err.value) == {"options.budget"}
    created = await harness.create(budget="999999999999999.99")
    assert created.session.options.budget.amount == "999999999999999.99"


async def test_what_a_peer_refuses_keeps_its_code_and_names_the_peer(harness):
    client = ClientSettings()
    cost_channel = aio_channel(f"127.0.0.1:{harness.cost_port}", client, token=TOKENS["service"])
    manifest_channel = aio_channel(f"127.0.0.1:{harness.manifest_port}", client, token=TOKENS["service"])
    dead_channel = aio_channel("127.0.0.1:1", client, token=TOKENS["service"])
    harness.channels.extend([cost_channel, manifest_channel, dead_channel])
    cost = CostPeer(cost_service_pb2_grpc.CostServiceStub(cost_channel), 5.0)
    with pytest.raises(InvalidArgument) as caught:
        await cost.set_budget(str(uuid.uuid4()), Decimal(10) ** 20)
    assert "cost service answered INVALID_ARGUMENT" in caught.value.message
    with pytest.raises(NotFound) as missing:
        await cost.reserve(str(uuid.uuid4()), [("k", Decimal(1), str(uuid.uuid4()))], 60.0)
    assert missing.value.resource_type == "budget" and "cost service" in missing.value.message
    manifests = ManifestPeer(manifest_service_pb2_grpc.ManifestServiceStub(manifest_channel), 5.0)
    with pytest.raises(NotFound) as missing:
        await manifests.get_manifest(str(uuid.uuid4()))
    assert missing.value.resource_type == "manifest" and "manifest service" in missing.value.message
    dead = CostPeer(cost_service_pb2_grpc.CostServiceStub(dead_channel), 5.0)
    with pytest.raises(Unavailable) as down:
        await dead.session_costs(str(uuid.uuid4()))
    assert "cost service answered UNAVAILABLE" in down.value.message
    # Through an RPC: the cost service refuses the manifest's estimate (units that are no
    # number); the create answers that refusal, not INTERNAL.
    manifest_id = harness.manifests.add([mfile("a.pdf")])
    summary = harness.manifests.manifests[manifest_id][0].summary
    summary.price_book_version = 1
    summary.estimated_by_operation.add(service="local", operation="compute_second", units="lots")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.create(manifest_id=manifest_id)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cost service" in err.value.details()


async def test_scopes(harness):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.worker.CreateSession(pb.CreateSessionRequest())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.stub("").GetSession(pb.GetSessionRequest(session_id=str(uuid.uuid4())))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.operator.ReportStageResult(pb.ReportStageResultRequest())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    session = (await harness.create()).session
    read = await harness.stubs["service"].GetSession(
        pb.GetSessionRequest(session_id=session.session_id)
    )
    assert read.session.session_id == session.session_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.stubs["service"].PauseSession(
            pb.PauseSessionRequest(session_id=session.session_id)
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_list_sessions_filters_and_pages(harness):
    ids = [(await harness.create(project=p)).session.session_id for p in ("Alpha", "Alpha", "Beta")]
    page = await harness.operator.ListSessions(pb.ListSessionsRequest(page_size=2))
    assert len(page.sessions) == 2 and page.next_page_token
    rest = await harness.operator.ListSessions(
        pb.ListSessionsRequest(page_size=2, page_token=page.next_page_token)
    )
    assert len(rest.sessions) == 1 and not rest.next_page_token
    assert {s.session_id for s in [*page.sessions, *rest.sessions]} == set(ids)
    alpha = await harness.operator.ListSessions(pb.ListSessionsRequest(project_name="alpha"))
    assert len(alpha.sessions) == 2
    running = await harness.operator.ListSessions(
        pb.ListSessionsRequest(state=pb.SESSION_STATE_RUNNING)
    )
    assert len(running.sessions) == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await harness.operator.ListSessions(pb.ListSessionsRequest(page_token="garbage!"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
