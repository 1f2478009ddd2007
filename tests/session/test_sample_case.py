"""The sample case end to end through the real services and a real Celery worker.

The stack of tests/session/stack.py: the manifest service scans a copy of
examples/sample-case, the cost service prices and records, the session
service (dispatcher and reconciler running) publishes through the pipelined
Celery publisher, and the worker of services/worker (solo pool, in a thread)
runs every stage and reports over gRPC. Done when VerifySession says PASS, with the corrupt and the encrypted
PDF permanent failures carrying the scan's reason and the duplicate skipped.
"""

from __future__ import annotations

import pytest
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.session.v1 import session_service_pb2 as pb

from services.common import convert

from .stack import sample_stack

pytestmark = pytest.mark.integration


async def test_the_sample_case_imports_and_verifies(
    db_url, pool, redis_url, token_env, case_copy, tmp_path
):
    async with sample_stack(db_url, pool, redis_url, token_env, case_copy, tmp_path) as stack:
        sessions, costs, manifests = stack.sessions, stack.costs, stack.manifests
        session_id = await stack.import_sample()
        scanned = stack.scanned
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
