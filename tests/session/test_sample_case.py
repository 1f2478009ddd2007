"""The sample case end to end through the real services and a real Celery worker.

The manifest service scans a copy of examples/sample-case, the cost service
prices and records, the session service (dispatcher and reconciler running)
publishes through the pipelined Celery publisher, and the worker of
services/worker (solo pool, in a thread) runs every stage and reports over
gRPC. Done when VerifySession says PASS, with the corrupt and the encrypted
PDF permanent failures carrying the scan's reason and the duplicate skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import SAMPLE_CASE, TOKENS
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2 as pb
from docimport.session.v1 import session_service_pb2_grpc

from services.common import convert
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


@pytest.fixture
def case_copy() -> AsyncIterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="di-session-case-"))
    root.chmod(0o755)
    target = root / "smith-v-jones"
    shutil.copytree(SAMPLE_CASE, target)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    yield target
    shutil.rmtree(root, ignore_errors=True)


async def test_the_sample_case_imports_and_verifies(
    db_url, pool, redis_url, token_env, case_copy, tmp_path
):
    from celery.contrib.testing.worker import start_worker

    from services.worker.app import create_app
    from services.worker.config import WorkerSettings

    client = ClientSettings()
    cost = await build_cost(CostSettings(database_url=db_url, **token_env), store=CostStore(pool))
    await CostStore(pool).ensure_default_price_book(
        CostSettings(database_url=db_url, **token_env).price_book_file, None
    )
    cost_channel = aio_channel(f"127.0.0.1:{cost.port}", client, token=TOKENS["service"])
    manifest = await build_manifest(
        ManifestSettings(
            database_url=db_url, source_roots=(case_copy.parent,), scan_workers=1, **token_env
        ),
        store=ManifestStore(pool),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
    )
    manifest_channel = aio_channel(f"127.0.0.1:{manifest.port}", client, token=TOKENS["service"])
    enqueuer = CeleryEnqueuer(redis_url)
    settings = SessionSettings(
        database_url=db_url,
        broker_url=redis_url,
        dispatch_interval=0.1,
        reconcile_interval=1.0,
        **token_env,
    )
    session_server = await build_session(
        settings,
        store=SessionStore(pool),
        enqueuer=enqueuer,
        manifest_stub=manifest_service_pb2_grpc.ManifestServiceStub(manifest_channel),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
        background=True,
    )
    operator_channels = [
        aio_channel(f"127.0.0.1:{port}", client, token=TOKENS["operator"])
        for port in (manifest.port, session_server.port, cost.port)
    ]
    manifests = manifest_service_pb2_grpc.ManifestServiceStub(operator_channels[0])
    sessions = session_service_pb2_grpc.SessionServiceStub(operator_channels[1])
    costs = cost_service_pb2_grpc.CostServiceStub(operator_channels[2])
    worker_settings = WorkerSettings(
        broker_url=redis_url,
        session_addr=f"127.0.0.1:{session_server.port}",
        cost_addr=f"127.0.0.1:{cost.port}",
        token=TOKENS["worker"],
        artifact_dir=tmp_path / "artifacts",
        ocr_engine="auto",
        pool="solo",
        rpc_timeout=30.0,
    )
    app = create_app(worker_settings)
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
        scanned = None
        async for event in manifests.AnalyzeSource(
            mpb.AnalyzeSourceRequest(
                request_id="sample", source_path=str(case_copy), case_name="Smith v. Jones"
            )
        ):
            if event.HasField("manifest"):
                scanned = event.manifest
        assert scanned is not None and scanned.state == mpb.MANIFEST_STATE_READY
        options = pb.SessionOptions(budget=convert.money("25"))
        created = await sessions.CreateSession(
            pb.CreateSessionRequest(
                request_id="sample-import",
                manifest_id=scanned.manifest_id,
                project_name="Smith v. Jones",
                options=options,
                start=True,
            )
        )
        session_id = created.session.session_id

        async def finished() -> bool:
            s = (await sessions.GetSession(pb.GetSessionRequest(session_id=session_id))).session
            return s.state in (pb.SESSION_STATE_COMPLETED, pb.SESSION_STATE_COMPLETED_WITH_ERRORS)

        await wait_for(finished, timeout=240, interval=0.5)
        final = (await sessions.GetSession(pb.GetSessionRequest(session_id=session_id))).session
        failed = (
            await sessions.ListSessionDocuments(
                pb.ListSessionDocumentsRequest(
                    session_id=session_id, state=pb.DOCUMENT_STATE_FAILED
                )
            )
        ).documents
        skipped = (
            await sessions.ListSessionDocuments(
                pb.ListSessionDocumentsRequest(
                    session_id=session_id, state=pb.DOCUMENT_STATE_SKIPPED
                )
            )
        ).documents
        assert {d.relative_path.rsplit("/", 1)[-1] for d in failed} == {
            "corrupt_scan.pdf",
            "sealed_records.pdf",
        }
        assert all(d.error_class == pb.ERROR_CLASS_PERMANENT and d.error_message for d in failed)
        assert "er_visit_summary_copy.pdf" in {d.relative_path.rsplit("/", 1)[-1] for d in skipped}
        report = await sessions.VerifySession(
            pb.VerifySessionRequest(session_id=session_id, deep=True)
        )
        assert report.verdict == pb.VERDICT_PASS, report
        assert report.counts.unaccounted == 0 and report.counts.in_progress == 0
        assert final.counts.completed == report.counts.completed
        found = {f.code: f.count for f in report.findings}
        assert found["duplicates"] == 1 and found["attachments"] == 1
        assert "excluded" not in found, "nothing in the sample case is excluded"
        ledger = await costs.GetSessionCosts(cpb.GetSessionCostsRequest(session_id=session_id))
        assert convert.parse_money(ledger.actual_total, "x", places=16) > 0
        # The manifest's priced plan is the session's estimate in the ledger.
        manifest_total = convert.parse_money(
            (await manifests.GetManifest(mpb.GetManifestRequest(manifest_id=scanned.manifest_id))).manifest.summary.estimated_total,
            "x", places=16,
        )
        assert manifest_total > 0
        assert convert.parse_money(ledger.estimate_total, "x", places=16) == manifest_total
        budget = (await costs.GetBudget(cpb.GetBudgetRequest(session_id=session_id))).budget
        assert (
            convert.parse_money(budget.reserved, "x", places=16) == 0
        )  # every admission was settled
    finally:
        await asyncio.to_thread(worker.__exit__, None, None, None)
        app.docimport_runner.get().reporter.close()
        app.close()
        await session_server.stop(1.0)
        await enqueuer.close()
        for channel in [*operator_channels, manifest_channel, cost_channel]:
            await channel.close()
        await manifest.close(1.0)
        await cost.stop(1.0)
