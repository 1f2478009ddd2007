"""The session CLI against the real service: import, watch, status, documents, retry, verify."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import TOKENS
from docimport.session.v1 import session_service_pb2 as pb
from typer.testing import CliRunner

from clients.cli import context
from clients.cli.app import app
from clients.cli.commands.session import WatchState
from clients.cli.context import Clients, set_clients
from services.common.config import ClientSettings

from .helpers import mfile, work, work_to_end


@pytest.fixture
def cli(harness):
    settings = ClientSettings(
        session_addr=f"127.0.0.1:{harness.port}",
        cost_addr=f"127.0.0.1:{harness.cost_port}",
        manifest_addr=f"127.0.0.1:{harness.manifest_port}",
        token=TOKENS["operator"],
        rpc_timeout=10,
    )
    clients = Clients(settings)
    set_clients(clients)
    runner = CliRunner()
    width = context.console.width
    context.console.width = 220  # tables on one line each

    async def run(*args: str) -> tuple[int, str]:
        result = await asyncio.to_thread(runner.invoke, app, list(args), catch_exceptions=False)
        return result.exit_code, result.output

    yield run
    context.console.width = width
    set_clients(None)
    clients.close()


async def test_import_dry_run_then_real_then_status(harness, cli, tmp_path):
    manifest_id = harness.manifests.add(
        [mfile("a.pdf"), mfile("b.pdf", problem="corrupt"), mfile("c.pdf", duplicate_of="a.pdf")]
    )
    code, out = await cli("import", "--manifest", manifest_id, "--case", "Demo", "--dry-run")
    assert code == 0, out
    assert "dry run" in out and "documents to process: 1" in out
    code, out = await cli("import", "--manifest", manifest_id, "--case", "Demo", "--json")
    assert code == 0, out
    session = json.loads(out)["session"]
    session_id = session["session_id"]
    assert session["state"] == "SESSION_STATE_RUNNING"
    code, out = await cli("status", session_id)
    assert code == 0 and "Demo" in out and "pending 1" in out
    code, out = await cli("sessions", "--case", "demo")
    assert code == 0 and session_id in out
    code, out = await cli("documents", session_id, "--state", "failed")
    assert code == 0 and "b.pdf" in out and "a.pdf" not in out
    code, out = await cli("documents", session_id, "--state", "nonsense")
    assert code == 2
    code, out = await cli("pause", session_id)
    assert code == 0 and "paused" in out
    code, out = await cli("resume", session_id)
    assert code == 0 and "running" in out
    await work_to_end(harness, session_id, tmp_path)
    docs = (
        await harness.operator.ListSessionDocuments(
            pb.ListSessionDocumentsRequest(session_id=session_id, state=pb.DOCUMENT_STATE_COMPLETED)
        )
    ).documents
    code, out = await cli("document", docs[0].document_id)
    assert code == 0 and "entities" in out and "succeeded" in out
    code, out = await cli("verify", session_id)
    assert code == 0 and "PASS" in out, out
    code, out = await cli("verify", session_id, "--json")
    assert code == 0 and json.loads(out)["verdict"] == "VERDICT_PASS"


async def test_import_a_manifest_file(harness, cli, tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(
        json.dumps(
            {
                "schema": "docimport-manifest/v1",
                "case_name": "From File",
                "source_path": "/data/case",
                "files": [{"path": "x.pdf"}, {"path": "y.pdf"}],
            }
        )
    )
    code, out = await cli("import", str(path), "--json")
    assert code == 0, out
    session = json.loads(out)["session"]
    assert session["project"]["name"] == "From File" and session["counts"]["total"] == "2"
    assert len(harness.manifests.imported) == 1
    # a file naming a manifest the service already has is not imported again
    known = harness.manifests.imported[0]
    path.write_text(
        json.dumps(
            {
                "schema": "docimport-manifest/v1",
                "manifest_id": known,
                "case_name": "From File",
                "source_path": "/data/case",
                "files": [],
            }
        )
    )
    code, out = await cli("import", str(path), "--json")
    assert code == 0 and json.loads(out)["session"]["manifest_id"] == known
    assert len(harness.manifests.imported) == 1
    code, out = await cli("import", str(tmp_path / "missing.json"))
    assert code == 2


async def test_watch_json_until_the_end(harness, cli, tmp_path):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(3)])).session
    watching = asyncio.create_task(cli("watch", session.session_id, "--json"))
    await asyncio.sleep(0.3)
    final = await work_to_end(harness, session.session_id, tmp_path)
    code, out = await asyncio.wait_for(watching, 10)
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert "snapshot" in lines[0]
    seqs = [int(x["seq"]) for x in lines if "document" in x or "state_change" in x]
    assert seqs == list(range(int(lines[0]["seq"]) + 1, final.last_seq + 1))
    assert all(x["resume_token"].startswith(f"{x['seq']}.") for x in lines)


async def test_watch_live_view_and_verify_failure(harness, cli, tmp_path):
    session = (await harness.create([mfile("a.pdf"), mfile("b.pdf")])).session
    watching = asyncio.create_task(cli("watch", session.session_id))
    await asyncio.sleep(0.3)
    messages = await harness.dispatch()
    await harness.result(
        messages[0],
        ok=False,
        error_class=pb.ERROR_CLASS_PERMANENT,
        message_text="cannot decode the scan",
    )
    await work(harness, messages[1], tmp_path)
    await work_to_end(harness, session.session_id, tmp_path)
    code, out = await asyncio.wait_for(watching, 10)
    assert code == 0, out
    assert "completed_with_errors" in out and "cannot decode the scan" in out
    code, out = await cli("verify", session.session_id)
    assert code == 1 and "FAIL" in out and "permanent_failure" in out  # 1 of 2 processable files


def test_watch_state_keeps_exact_counts():
    state = WatchState()
    snapshot = pb.WatchSessionResponse(
        seq=5,
        snapshot=pb.Session(
            state=pb.SESSION_STATE_RUNNING, counts=pb.DocumentCounts(total=2, pending=2)
        ),
    )
    state.apply(snapshot)

    def doc(seq, old, new, stage, old_stage, cost=""):
        event = pb.DocumentEvent(
            document_id="d", state=new, previous_state=old, stage=stage, previous_stage=old_stage
        )
        if cost:
            event.cost.amount = cost
        return pb.WatchSessionResponse(seq=seq, document=event)

    P, Q, R, C = (
        pb.DOCUMENT_STATE_PENDING,
        pb.DOCUMENT_STATE_QUEUED,
        pb.DOCUMENT_STATE_RUNNING,
        pb.DOCUMENT_STATE_COMPLETED,
    )
    for response in (
        doc(6, P, Q, 1, 0),
        doc(7, Q, R, 1, 1),
        doc(8, R, P, 2, 1, "0.0015"),
        doc(9, P, Q, 2, 2),
        doc(10, Q, P, 3, 2, "0.001"),
        doc(11, P, Q, 3, 3),
        doc(12, Q, C, 3, 3, "0.0005"),
    ):
        state.apply(response)
    assert state.counts[C] == 1 and state.counts[P] == 1 and state.active == 1
    assert dict(state.stage_done) == {"extract": 1, "chunk": 1, "entities": 1}
    assert str(state.cost) == "0.0030" and state.seq == 12
    state.apply(pb.WatchSessionResponse(seq=12, heartbeat=pb.Heartbeat()))
    assert state.seq == 12


def test_watch_reconnects_with_the_resume_token_and_takes_a_snapshot_for_truth(monkeypatch):
    import grpc

    from clients.cli.commands import session as cli_session

    class Unavailable(grpc.RpcError):
        def code(self):  # type: ignore[no-untyped-def]
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "connection reset"

    def doc(seq: int, state: int, prev: int) -> pb.WatchSessionResponse:
        return pb.WatchSessionResponse(seq=seq, resume_token=f"{seq}.d{seq}", document=pb.DocumentEvent(
            document_id="d", state=state, previous_state=prev, stage=1, previous_stage=1))

    class Call:
        def __init__(self, items, fail: bool) -> None:
            self.items, self.fail = items, fail

        def __iter__(self):  # type: ignore[no-untyped-def]
            yield from self.items
            if self.fail:
                raise Unavailable()

        def cancel(self) -> None:
            pass

    asked: list[tuple[int, str]] = []

    def snapshot(seq: int, **counts: int) -> pb.WatchSessionResponse:
        return pb.WatchSessionResponse(seq=seq, resume_token=f"{seq}.s{seq}", snapshot=pb.Session(
            state=pb.SESSION_STATE_RUNNING, counts=pb.DocumentCounts(total=1, **counts)))

    def stream(session_id: str, after: int, token: str) -> Call:
        asked.append((after, token))
        if len(asked) == 1:
            return Call([snapshot(3, pending=1),
                         doc(4, pb.DOCUMENT_STATE_QUEUED, pb.DOCUMENT_STATE_PENDING),
                         doc(5, pb.DOCUMENT_STATE_RUNNING, pb.DOCUMENT_STATE_QUEUED)], fail=True)
        if len(asked) == 2:
            # The server lost event 5 (its seq names another one now): a snapshot, not events.
            return Call([snapshot(4, queued=1)], fail=True)
        return Call([doc(5, pb.DOCUMENT_STATE_RUNNING, pb.DOCUMENT_STATE_QUEUED),
                     doc(6, pb.DOCUMENT_STATE_COMPLETED, pb.DOCUMENT_STATE_RUNNING),
                     pb.WatchSessionResponse(seq=7, state_change=pb.SessionStateChange(
                         state=pb.SESSION_STATE_COMPLETED))], fail=False)

    monkeypatch.setattr(cli_session, "_stream", stream)
    monkeypatch.setattr(cli_session.time, "sleep", lambda _s: None)
    state = cli_session.follow("s", as_json=True)
    # Each resume names the last message it had; the snapshot's counts replaced the old ones.
    assert asked == [(0, ""), (5, "5.d5"), (4, "4.s4")]
    assert state.terminal and state.counts[pb.DOCUMENT_STATE_COMPLETED] == 1 and state.active == 0


async def test_costs_of_a_session_with_what_lost_attempts_cost(harness, cli):
    """`docimport costs`: the ledger's totals, estimate against actual, the budget, and the
    part spent on attempts that were lost (here: a run expired, its late result kept its cost)."""
    from decimal import Decimal

    from docimport.common.v1 import common_pb2
    from docimport.cost.v1 import cost_service_pb2 as cpb

    session = (await harness.create([mfile("pleadings/a.pdf")], budget="5")).session
    [lost] = await harness.dispatch()
    await harness.started(lost)
    async with harness.pool.acquire() as conn:
        await conn.execute("UPDATE session.stage_runs SET lease_expires_at = now() - interval '1 s'")
    await harness.reconciler.run_once()
    [again] = await harness.dispatch()
    with pytest.raises(Exception):  # refused: the run is expired; its cost is kept
        await harness.result(lost, cost="0.3", charge=True)
    await harness.result(again, cost="1.2", charge=True)
    await harness.cost_as_service().RecordCosts(cpb.RecordCostsRequest(events=[cpb.CostEvent(
        session_id=session.session_id, document_id=again.payload.document_id,
        stage=common_pb2.STAGE_EXTRACT, attempt=2, service="local", operation="compute_second",
        units="3", kind=cpb.COST_KIND_ACTUAL, cache_hit=True, category="pleadings")]))
    code, text = await cli("costs", session.session_id)
    assert code == 0, text
    for fragment in ("actual $1.50", "of it spent on lost or cancelled attempts: $0.30",
                     "By service and operation", "aws_textract/ocr_page", "By stage", "extract",
                     "Estimate against actual", "Most expensive documents", "Budget", "$5.00",
                     "cache hits 1"):
        assert fragment in text, (fragment, text)
    code, text = await cli("costs", session.session_id, "--json")
    assert code == 0
    data = json.loads(text)
    assert Decimal(data["costs"]["actual_total"]["amount"]) == Decimal("1.5")
    assert Decimal(data["wasted"]) == Decimal("0.3") and data["budget"]["limit"]["amount"] == "5"
    assert Decimal(data["budget"]["spent"]["amount"]) == Decimal("1.5")
    code, text = await cli("costs", "6a3f9e3c-0000-4000-8000-000000000000")
    assert code == 4 and "not found" in text.lower(), text
    code, text = await cli("costs", "not-a-session")
    assert code == 2 and "session_id" in text
