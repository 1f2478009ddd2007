"""Stage counts: written by triggers on stage_runs, folded by the reconciler, read by GetSession."""

from __future__ import annotations

import asyncio

from conftest import racing
from docimport.session.v1 import session_service_pb2 as pb

from .helpers import mfile, stage_of

PERMANENT = pb.ERROR_CLASS_PERMANENT


async def stage_counts(harness, session_id: str) -> dict[str, tuple[int, ...]]:
    s = (await harness.operator.GetSession(pb.GetSessionRequest(session_id=session_id))).session
    return {
        stage_of(x.stage).removeprefix("STAGE_").lower(): (
            x.queued,
            x.running,
            x.succeeded,
            x.failed,
            x.cache_hits,
        )
        for x in s.stages
    }


async def expect(harness, session_id: str, **expected: tuple[int, ...]) -> None:
    """GetSession shows `expected` (other stages: zeros) and a recount agrees, before and after a fold."""
    want = {stage: expected.get(stage, (0, 0, 0, 0, 0)) for stage in ("extract", "chunk", "entities")}
    assert await stage_counts(harness, session_id) == want
    assert await harness.store.stage_count_drift(session_id) == {}
    await harness.store.fold_stage_counts()
    async with harness.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM session.stage_count_deltas") == 0
    assert await stage_counts(harness, session_id) == want
    assert await harness.store.stage_count_drift(session_id) == {}


async def test_every_change_of_a_run_is_counted_once(harness):
    session = (await harness.create([mfile(f"{c}.pdf") for c in "abcd"], max_in_flight=4)).session
    sid = session.session_id
    a, b, c, d = sorted(await harness.dispatch(), key=lambda m: m.payload.document_id)
    await expect(harness, sid, extract=(4, 0, 0, 0, 0))

    await harness.started(a)
    await harness.started(b)
    await expect(harness, sid, extract=(2, 2, 0, 0, 0))

    await harness.result(a)
    await harness.result(b, cache_hit=True)
    await harness.result(b, cache_hit=True)  # a replay changes nothing
    chunks = await harness.dispatch()
    assert len(chunks) == 2
    await expect(harness, sid, extract=(2, 0, 2, 0, 1), chunk=(2, 0, 0, 0, 0))

    await harness.started(c)
    await harness.result(c, ok=False, error_class=PERMANENT, message_text="corrupt")
    await expect(harness, sid, extract=(1, 0, 2, 1, 1), chunk=(2, 0, 0, 0, 0))

    # d's message was lost: its run expires (not counted) and a second attempt is queued
    async with harness.pool.acquire() as conn:
        await conn.execute(
            "UPDATE session.stage_runs SET lease_expires_at = now() - interval '1 s' "
            "WHERE document_id = $1::uuid",
            d.payload.document_id,
        )
    assert await harness.reconciler.run_once() == 1
    [again] = await harness.dispatch()
    assert again.payload.attempt == 2
    await expect(harness, sid, extract=(1, 0, 2, 1, 1), chunk=(2, 0, 0, 0, 0))

    await harness.operator.CancelSession(pb.CancelSessionRequest(session_id=sid))
    await expect(harness, sid, extract=(0, 0, 2, 1, 1))


async def test_folds_racing_with_reports_lose_and_repeat_nothing(harness):
    n = 40
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(n)], max_in_flight=n)).session
    messages = await harness.dispatch()
    assert len(messages) == n
    async def report(m) -> None:
        await harness.started(m)
        await harness.result(m)

    reports = asyncio.gather(*(report(m) for m in messages))
    assert await racing(reports, harness.store.fold_stage_counts) > 1
    await expect(harness, session.session_id, extract=(0, 0, n, 0, 0))
