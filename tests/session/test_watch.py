"""WatchSession: snapshot then events, resume without gap or duplicate, heartbeats, coalescing."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from docimport.session.v1 import session_service_pb2 as pb
from google.protobuf import duration_pb2

from .helpers import mfile, tune


def watch_request(
    session_id: str, after: int = 0, heartbeat: float = 0.0
) -> pb.WatchSessionRequest:
    request = pb.WatchSessionRequest(session_id=session_id, resume_after_seq=after)
    if heartbeat:
        request.heartbeat_interval.CopyFrom(duration_pb2.Duration(nanos=int(heartbeat * 1e9)))
    return request


class Collector:
    """Reads a watch stream in the background."""

    def __init__(self, harness, session_id: str, after: int = 0, heartbeat: float = 0.0):
        self.call = harness.operator.WatchSession(watch_request(session_id, after, heartbeat))
        self.items: list[pb.WatchSessionResponse] = []
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for item in self.call:
                self.items.append(item)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise
        finally:
            self.done.set()

    def seqs(self) -> list[int]:
        return [
            i.seq for i in self.items if not i.HasField("heartbeat") and not i.HasField("snapshot")
        ]

    async def until(self, predicate, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"watch did not get there: {self.items}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.call.cancel()
        await self.done.wait()


async def test_snapshot_then_events_until_the_session_finishes(harness):
    session = (await harness.create([mfile("a.pdf"), mfile("b.pdf")])).session
    watcher = Collector(harness, session.session_id)
    await watcher.until(lambda w: w.items)
    first = watcher.items[0]
    assert first.HasField("snapshot") and first.seq == session.last_seq
    assert first.snapshot.counts.pending == 2
    final = await harness.run_to_end(session.session_id)
    await asyncio.wait_for(watcher.done.wait(), 5)  # the stream ends at a terminal state
    seqs = watcher.seqs()
    assert seqs == list(range(first.seq + 1, final.last_seq + 1))
    last = watcher.items[-1]
    assert last.HasField("state_change") and last.state_change.state == pb.SESSION_STATE_COMPLETED
    docs = [i.document for i in watcher.items if i.HasField("document")]
    assert {d.relative_path for d in docs} == {"a.pdf", "b.pdf"}
    # counts kept from the snapshot plus each event's previous state equal the server's
    counts = {pb.DOCUMENT_STATE_PENDING: 2}
    for d in docs:
        counts[d.previous_state] = counts.get(d.previous_state, 0) - 1
        counts[d.state] = counts.get(d.state, 0) + 1
    assert {k: v for k, v in counts.items() if v} == {pb.DOCUMENT_STATE_COMPLETED: 2}
    assert (
        sum(1 for d in docs if d.previous_stage == 3 and d.state == pb.DOCUMENT_STATE_COMPLETED)
        == 2
    )


async def test_resume_after_seq_has_no_gap_and_no_duplicate(harness):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(6)])).session
    watcher = Collector(harness, session.session_id)
    await watcher.until(lambda w: w.items)  # the snapshot comes before any dispatch
    messages = await harness.dispatch()
    for m in messages[:3]:
        await harness.result(m)
    await watcher.until(lambda w: len(w.seqs()) >= 9)  # 6 queued + 3 results
    seen = watcher.seqs()
    await watcher.close()
    # more happens while nobody watches
    for m in messages[3:]:
        await harness.started(m)
        await harness.result(m)
    resumed = Collector(harness, session.session_id, after=seen[-1])
    final = await harness.run_to_end(session.session_id)
    await asyncio.wait_for(resumed.done.wait(), 5)
    assert not any(i.HasField("snapshot") for i in resumed.items)
    everything = seen + resumed.seqs()
    first = watcher.items[0].seq
    assert everything == list(range(first + 1, final.last_seq + 1))


async def test_events_of_long_finished_sessions_are_pruned_and_resumes_get_a_snapshot(harness):
    old = (await harness.create([mfile("a.pdf"), mfile("b.pdf")])).session
    recent = (await harness.create([mfile("c.pdf")])).session
    old_final = await harness.run_to_end(old.session_id)
    recent_final = await harness.run_to_end(recent.session_id)
    live = (await harness.create([mfile("d.pdf")])).session
    await harness.dispatch()

    async def events_of(session_id: str) -> int:
        return await harness.pool.fetchval(
            "SELECT count(*) FROM session.session_events WHERE session_id = $1", uuid.UUID(session_id))

    assert await events_of(old.session_id) == old_final.last_seq > 5
    await harness.pool.execute(
        "UPDATE session.import_sessions SET finished_at = now() - interval '31 days' WHERE session_id = $1",
        uuid.UUID(old.session_id))
    await harness.reconciler.run_once()  # retention: 30 days by default
    assert await events_of(old.session_id) == 0
    assert await events_of(recent.session_id) == recent_final.last_seq
    assert await events_of(live.session_id) > 0
    # A resume into deleted events gets the final state as a snapshot, then the stream ends.
    resumed = Collector(harness, old.session_id, after=2)
    await asyncio.wait_for(resumed.done.wait(), 5)
    assert [i.WhichOneof("event") for i in resumed.items] == ["snapshot"]
    snap = resumed.items[0]
    assert snap.seq == old_final.last_seq and snap.snapshot.counts.completed == 2
    # Retention 0 keeps everything.
    tune(harness, event_retention_days=0)
    await harness.pool.execute(
        "UPDATE session.import_sessions SET finished_at = now() - interval '400 days' WHERE session_id = $1",
        uuid.UUID(recent.session_id))
    await harness.reconciler.run_once()
    assert await events_of(recent.session_id) == recent_final.last_seq


async def test_heartbeats_keep_an_idle_stream_alive(harness):
    session = (await harness.create(start=False)).session
    watcher = Collector(harness, session.session_id, heartbeat=0.1)
    await watcher.until(lambda w: sum(i.HasField("heartbeat") for i in w.items) >= 3, timeout=3)
    beats = [i for i in watcher.items if i.HasField("heartbeat")]
    assert all(b.seq == session.last_seq for b in beats)
    await watcher.close()


async def test_many_watchers_share_one_tail(harness):
    session = (
        await harness.create([mfile(f"{i}.pdf") for i in range(20)], max_in_flight=20)
    ).session
    watchers = [Collector(harness, session.session_id) for _ in range(10)]
    for w in watchers:
        await w.until(lambda w: w.items)
    final = await harness.run_to_end(session.session_id)
    for w in watchers:
        await asyncio.wait_for(w.done.wait(), 5)
        assert w.seqs() == list(range(w.items[0].seq + 1, final.last_seq + 1))
    assert harness.server.hub._tails == {}


async def test_a_slow_watcher_gets_a_coalesced_snapshot(harness):
    tune(harness, watch_coalesce_after=10)
    session = (
        await harness.create([mfile(f"{i}.pdf") for i in range(30)], max_in_flight=30)
    ).session
    # resuming from far behind: one snapshot instead of the backlog
    await harness.dispatch()
    resumed = Collector(harness, session.session_id, after=1)
    await resumed.until(lambda w: w.items)
    assert resumed.items[0].HasField("snapshot")
    assert resumed.items[0].snapshot.counts.queued == 30
    await resumed.close()
    # a watcher that stops reading while events pile up
    slow = harness.operator.WatchSession(watch_request(session.session_id))
    first = await slow.read()
    assert first.HasField("snapshot")
    last = (
        await harness.operator.GetSession(pb.GetSessionRequest(session_id=session.session_id))
    ).session
    messages = [m for m in (await harness.dispatch())]
    async with harness.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT document_id, stage, attempt, task_id FROM session.stage_runs"
        )
    assert rows and not messages
    # 30 starts happen while the watcher is not reading
    await asyncio.gather(
        *(
            harness.worker.ReportStageStarted(
                pb.ReportStageStartedRequest(
                    document_id=str(r["document_id"]),
                    stage=1,
                    attempt=r["attempt"],
                    task_id=r["task_id"],
                )
            )
            for r in rows
        )
    )
    final = (
        await harness.operator.GetSession(pb.GetSessionRequest(session_id=session.session_id))
    ).session
    assert final.counts.running == 30 and final.last_seq == last.last_seq + 30
    items = []
    while not items or items[-1].seq < final.last_seq:
        items.append(await asyncio.wait_for(slow.read(), 5))
    snapshots = [i for i, item in enumerate(items) if item.HasField("snapshot")]
    assert snapshots, "the watcher fell behind and should have got a snapshot"
    assert len(items) < 30  # coalesced: not one message per event
    after = items[snapshots[-1] :]
    assert [i.seq for i in after[1:]] == list(range(after[0].seq + 1, final.last_seq + 1))
    slow.cancel()


async def test_watch_errors(harness):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in harness.operator.WatchSession(watch_request(str(uuid.uuid4()))):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    session = (await harness.create()).session
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in harness.operator.WatchSession(
            watch_request(session.session_id, after=10_000)
        ):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in harness.worker.WatchSession(watch_request(session.session_id)):
            pass
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
