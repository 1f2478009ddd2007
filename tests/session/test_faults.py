"""Faults mid-import against the real stack, at default settings (issue 19, "Done when").

The session service and the worker (prefork) run as processes of their own
(tests/session/faults.py), with the lease settings they ship with: a lease
of 45 s renewed every 5 s while a run is seen alive. A small case (a scan
that needs OCR, which takes seconds: a run to break, and quick text files
queued behind it) is imported while a watcher follows it, and one fault is
injected mid-import:

- SIGKILL of the worker's whole process group (its main process and its
  pool process) while the scan's OCR runs; a new worker starts at once;
- SIGKILL of the worker's pool process only (Celery gives its message back);
- Redis losing every message (FLUSHDB: queued tasks, unacknowledged ones);
- SIGKILL of the session service while a run finishes into the worker's
  outbox, then of the worker too; both are started again;
- Postgres stopped at once (SIGQUIT: immediate shutdown, no checkpoint)
  for 60 s.

Each time every document completes within 120 s of the fault's end, no
stage succeeds twice, the ledger, the session's cost and the budget's spent
amount agree (and each run's cost is what the ledger charged it), verify
says PASS, and the watcher saw every event once, in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from decimal import Decimal

import asyncpg
import pytest
import redis
from conftest import TOKENS
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.session.v1 import session_service_pb2 as pb

from services.common import db, localinfra
from services.common.migrate import migrate
from services.common.scratchdb import with_database

from .faults import FaultStack, Watcher, assert_one_truth
from .helpers import readable_case, wait_for

pytestmark = pytest.mark.integration

# A scan that needs OCR (seconds of work: a run to kill) and quick text files.
FILES = (
    "discovery/scanned_deposition_excerpt.pdf",
    "pleadings/complaint.pdf",
    "pleadings/answer.pdf",
    "correspondence/call_notes.txt",
)
SCAN = "scanned_deposition_excerpt.pdf"
# Every document completes within this many seconds of a fault's end.
RECOVERY = 120.0


@pytest.fixture
def small_case() -> Iterator[Path]:
    with readable_case(FILES) as target:
        yield target


@pytest.fixture
async def stack(
    db_url: str, pool: asyncpg.Pool, redis_url: str, tmp_path: Path, small_case: Path
) -> AsyncIterator[FaultStack]:
    async with FaultStack.running(db_url, redis_url, tmp_path, small_case, pool) as s:
        yield s


async def scan_running(stack: FaultStack, session_id: str) -> asyncpg.Record | None:
    return await stack.pool.fetchrow(
        "SELECT r.document_id, r.attempt, r.task_id FROM session.stage_runs r"
        " JOIN session.session_documents d USING (document_id)"
        " WHERE r.session_id = $1 AND r.state = 'running' AND r.stage = 'extract'"
        " AND d.relative_path LIKE $2",
        session_id,
        f"%{SCAN}",
    )


async def runs_of(stack: FaultStack, session_id: str, document_id: object, stage: str) -> list:
    return await stack.pool.fetch(
        "SELECT attempt, state FROM session.stage_runs"
        " WHERE session_id = $1 AND document_id = $2 AND stage = $3 ORDER BY attempt",
        session_id,
        document_id,
        stage,
    )


async def test_a_worker_killed_mid_task_is_recovered_within_two_minutes(
    stack: FaultStack,
) -> None:
    worker = stack.start_worker("worker-1")
    session_id = await stack.analyze_and_import()
    watcher = Watcher(stack, session_id)
    watcher.start()
    await wait_for(lambda: scan_running(stack, session_id), timeout=60, interval=0.05)
    killed = await scan_running(stack, session_id)
    assert killed is not None, await stack.describe(session_id)
    await asyncio.sleep(0.5)  # well inside the OCR
    worker.kill()
    stack.start_worker("worker-2")
    took = await stack.wait_finished(session_id, timeout=RECOVERY)
    await assert_one_truth(stack, session_id, len(FILES))
    await watcher.finish()
    # the run the killed worker held was lost (nobody saw it any more) and done again
    redone = await runs_of(stack, session_id, killed["document_id"], "extract")
    assert [(r["attempt"], r["state"]) for r in redone][:1] == [(killed["attempt"], "expired")]
    assert redone[-1]["state"] == "succeeded", (took, redone)


async def test_a_killed_pool_process_gives_its_run_back_at_once(stack: FaultStack) -> None:
    """Only the pool process dies: Celery gives its message back (reject_on_worker_lost) and
    the same attempt runs again, asked about first: no lease has to run out."""
    worker = stack.start_worker("worker")
    session_id = await stack.analyze_and_import()
    watcher = Watcher(stack, session_id)
    watcher.start()
    await wait_for(lambda: scan_running(stack, session_id), timeout=60, interval=0.05)
    killed = await scan_running(stack, session_id)
    assert killed is not None
    main = worker.process.pid
    (child,) = Path(f"/proc/{main}/task/{main}/children").read_text().split()
    os.kill(int(child), signal.SIGKILL)
    took = await stack.wait_finished(session_id, timeout=RECOVERY)
    runs = await assert_one_truth(stack, session_id, len(FILES))
    await watcher.finish()
    assert took < 40, f"{took:.0f} s: the run waited for its lease"
    assert {(r["attempt"], r["state"]) for r in runs} == {(1, "succeeded")}, runs


async def test_redis_losing_its_data_mid_import_is_recovered_within_two_minutes(
    stack: FaultStack,
) -> None:
    stack.start_worker("worker")
    session_id = await stack.analyze_and_import()
    watcher = Watcher(stack, session_id)
    watcher.start()

    async def queued_behind_the_scan() -> bool:
        counts = await stack.pool.fetchrow(
            "SELECT count(*) FILTER (WHERE state = 'running') AS running,"
            " count(*) FILTER (WHERE state = 'queued') AS queued"
            " FROM session.stage_runs WHERE session_id = $1",
            session_id,
        )
        return counts["running"] >= 1 and counts["queued"] >= 1

    await wait_for(queued_behind_the_scan, timeout=60, interval=0.02)
    lost = {
        (r["document_id"], r["stage"], r["attempt"])
        for r in await stack.pool.fetch(
            "SELECT document_id, stage, attempt FROM session.stage_runs"
            " WHERE session_id = $1 AND state = 'queued'",
            session_id,
        )
    }
    client = redis.Redis.from_url(stack.redis_url)
    try:
        assert client.dbsize() > 0, "nothing was in Redis to lose"
        client.flushdb()
    finally:
        client.close()
    took = await stack.wait_finished(session_id, timeout=RECOVERY)
    runs = await assert_one_truth(stack, session_id, len(FILES))
    # the loss was seen (the broker's epoch vanished) and the lost runs did not wait for
    # their 45 s leases
    log = stack.session.log_path.read_text(errors="replace")  # type: ignore[union-attr]
    assert "the broker lost its data:" in log
    assert took < 40, f"{took:.0f} s"
    await watcher.finish()
    state = {(r["document_id"], r["stage"], r["attempt"]): r["state"] for r in runs}
    # what Redis lost was given up and enqueued again; what a worker had already taken ran
    assert any(state[run] == "expired" for run in lost), (lost, state)
    assert all(state[run] in ("expired", "succeeded") for run in lost), (lost, state)


async def test_the_session_service_and_the_worker_killed_lose_no_finished_run(
    stack: FaultStack,
) -> None:
    """The session service dies; the worker finishes a run it cannot deliver (it waits in its
    outbox), then dies too. Both come back: the new worker delivers the dead one's finished
    run, which is not run again, and the watcher resumes without a gap."""
    worker = stack.start_worker("worker-1")
    session_id = await stack.analyze_and_import()
    watcher = Watcher(stack, session_id)
    watcher.start()
    await wait_for(lambda: scan_running(stack, session_id), timeout=60, interval=0.05)
    stack.kill_session()
    await wait_for(lambda: stack.outbox_runs() > 0, timeout=60, interval=0.1)
    worker.kill()
    waiting = stack.outbox_runs()
    stack.start_worker("worker-2")
    await asyncio.sleep(2)
    await stack.start_session()
    await stack.wait_finished(session_id, timeout=RECOVERY)
    runs = await assert_one_truth(stack, session_id, len(FILES))
    await watcher.finish(timeout=60)
    assert watcher.connects >= 2, "the watcher never had to reconnect"
    assert stack.outbox_runs() == 0
    # the scan's extract finished while the service was down: delivered, not done again
    assert waiting >= 1
    scan = [r for r in runs if r["stage"] == "extract" and r["attempt"] == 1]
    assert all(r["state"] == "succeeded" for r in scan), runs


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[tuple[localinfra.PostgresInstance, str]]:
    """A Postgres of this test's own (it is stopped mid-test), migrated, and a database URL."""
    instance = await asyncio.to_thread(localinfra.start_postgres, tmp_path / "pg")
    url = with_database(instance.dsn, "postgres")
    await migrate(url)
    try:
        yield instance, url
    finally:
        current = localinfra.load_postgres(tmp_path / "pg")
        if current is not None:
            await asyncio.to_thread(localinfra.stop, current)


async def test_postgres_stopped_for_a_minute_is_recovered_within_two_minutes(
    own_postgres: tuple[localinfra.PostgresInstance, str],
    redis_url: str,
    tmp_path: Path,
    small_case: Path,
) -> None:
    instance, url = own_postgres
    pool = await db.create_pool(url, min_size=1, max_size=8)
    try:
        async with FaultStack.running(url, redis_url, tmp_path, small_case, pool) as stack:
            stack.start_worker("worker")
            session_id = await stack.analyze_and_import()
            watcher = Watcher(stack, session_id)
            watcher.start()
            await wait_for(lambda: scan_running(stack, session_id), timeout=60, interval=0.05)
            os.kill(instance.pid, signal.SIGQUIT)  # immediate shutdown
            await asyncio.sleep(60)
            again = await asyncio.to_thread(localinfra.start_postgres, tmp_path / "pg")
            assert again.port == instance.port
            began = time.monotonic()
            await stack.wait_finished(session_id, timeout=RECOVERY)
            await assert_one_truth(stack, session_id, len(FILES))
            await watcher.finish(timeout=60)
            assert time.monotonic() - began < RECOVERY
    finally:
        await pool.close()


async def test_after_a_cancel_no_queued_run_starts_and_what_was_spent_shows_everywhere(
    stack: FaultStack,
) -> None:
    """Runs queued behind the scan (one prefetched by the worker, the others in Redis) when
    the session is cancelled: none of them starts its work. The scan's run, under way, ends,
    and its charge is in the ledger, the session's cost (as waste) and the budget."""
    stack.start_worker("worker")
    session_id = await stack.analyze_and_import()
    await wait_for(lambda: scan_running(stack, session_id), timeout=60, interval=0.05)
    scan = await scan_running(stack, session_id)
    assert scan is not None
    queued = await stack.pool.fetch(
        "SELECT document_id, stage, attempt FROM session.stage_runs"
        " WHERE session_id = $1 AND state = 'queued'",
        session_id,
    )
    assert queued, await stack.describe(session_id)
    sessions = stack.sessions()
    await sessions.CancelSession(pb.CancelSessionRequest(session_id=session_id))

    async def scan_charged() -> bool:
        return await stack.pool.fetchval(
            "SELECT cost IS NOT NULL FROM session.stage_runs"
            " WHERE document_id = $1 AND stage = 'extract' AND attempt = $2",
            scan["document_id"],
            scan["attempt"],
        )

    await wait_for(scan_charged, timeout=60, interval=0.2)
    await asyncio.sleep(3)  # a queued run that started anyway would have reported by now
    runs = await stack.pool.fetch(
        "SELECT document_id, stage, attempt, state, started_at, cost FROM session.stage_runs"
        " WHERE session_id = $1",
        session_id,
    )
    state = {(r["document_id"], r["stage"], r["attempt"]): r for r in runs}
    for key in ((q["document_id"], q["stage"], q["attempt"]) for q in queued):
        assert state[key]["state"] == "cancelled" and state[key]["started_at"] is None, key
        assert state[key]["cost"] is None, key
    charged = {
        (r["document_id"], r["stage"], r["attempt"])
        for r in await stack.pool.fetch(
            "SELECT DISTINCT document_id, stage, attempt FROM cost.cost_events"
            " WHERE session_id = $1 AND kind = 'actual'",
            session_id,
        )
    }
    assert not charged & {(q["document_id"], q["stage"], q["attempt"]) for q in queued}
    log = stack.workers[0].log_path.read_text(errors="replace")
    assert "revoked" in log.lower() or "discarding revoked" in log.lower() or len(queued) == 0
    # one money truth after a cancel
    final = (await sessions.GetSession(pb.GetSessionRequest(session_id=session_id))).session
    assert final.state == pb.SESSION_STATE_CANCELLED
    ledger = await stack.pool.fetchval(
        "SELECT sum(amount) FROM cost.cost_events WHERE session_id = $1 AND kind = 'actual'",
        session_id,
    )
    budget = await stack.pool.fetchrow(
        "SELECT limit_amount FROM cost.budgets WHERE session_id = $1", session_id
    )
    assert budget is not None
    costs = cost_service_pb2_grpc.CostServiceStub(
        stack._channel(stack.cost_port, TOKENS["operator"])
    )
    spent = (await costs.GetBudget(cpb.GetBudgetRequest(session_id=session_id))).budget
    assert Decimal(final.cost_so_far.amount) == ledger == Decimal(spent.spent.amount) > 0
    assert Decimal(spent.reserved.amount) == 0
    assert Decimal(final.wasted_cost.amount) == state[scan["document_id"], "extract", scan["attempt"]]["cost"]
    report = await sessions.VerifySession(pb.VerifySessionRequest(session_id=session_id))
    assert "cost_mismatch" not in {f.code for f in report.findings}, report
