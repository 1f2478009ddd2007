"""WatchSession: snapshot then events, resume without gap or duplicate, heartbeats, coalescing,
and resume tokens that catch a database gone back in time."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from docimport.session.v1 import session_service_pb2 as pb
from google.protobuf import duration_pb2

from .helpers import mfile, tune


def watch_request(
    session_id: str, after: int = 0, heartbeat: float = 0.0, token: str = ""
) -> pb.WatchSessionRequest:
    request = pb.WatchSessionRequest(
        session_id=session_id, resume_after_seq=after, resume_token=token
    )
    if heartbeat:
        request.heartbeat_interval.CopyFrom(
            duration_pb2.Duration(seconds=int(heartbeat), nanos=int(heartbeat % 1 * 1e9))
        )
    return request


class Collector:
    """Reads a watch stream in the background."""

    def __init__(
        self, harness, session_id: str, after: int = 0, heartbeat: float = 0.0, token: str = ""
    ):
        self.call = harness.operator.WatchSession(
            watch_request(session_id, after, heartbeat, token)
        )
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
    for request, field in (
        (pb.WatchSessionRequest(session_id=session.session_id, resume_token="nonsense"),
         "resume_token"),
        (pb.WatchSessionRequest(session_id=session.session_id, resume_token="1.ab12",
                                resume_after_seq=2), "resume_after_seq"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in harness.operator.WatchSession(request):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in harness.worker.WatchSession(watch_request(session.session_id)):
            pass
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ------------------------------------------------------------ resume tokens


async def _replace_event(harness, session_id: str, seq: int) -> None:
    """What a database that lost committed events does: the seq names another event now."""
    async with harness.pool.acquire() as conn, conn.transaction():
        deleted = await conn.execute(
            "DELETE FROM session.session_events WHERE session_id = $1 AND seq = $2",
            uuid.UUID(session_id), seq)
        assert deleted == "DELETE 1"
        await conn.execute(
            "INSERT INTO session.session_events (session_id, seq, event_time, kind, payload)"
            " VALUES ($1, $2, now(), 'state_change', '{\"state\": \"running\"}')",
            uuid.UUID(session_id), seq)


async def test_every_message_carries_a_token_and_a_token_resume_has_no_gap_and_no_duplicate(
    harness,
):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(4)])).session
    watcher = Collector(harness, session.session_id, heartbeat=0.1)
    await watcher.until(lambda w: w.items)
    messages = await harness.dispatch()
    await harness.result(messages[0])
    await watcher.until(lambda w: len(w.seqs()) >= 5)  # 4 queued + 1 result
    await watcher.until(lambda w: w.items[-1].HasField("heartbeat"))
    await watcher.close()
    assert all(i.resume_token for i in watcher.items)
    assert all(i.resume_token.startswith(f"{i.seq}.") for i in watcher.items)
    seen = watcher.seqs()
    last_event = [i for i in watcher.items if not i.HasField("heartbeat")][-1]
    assert watcher.items[-1].resume_token == last_event.resume_token  # a heartbeat repeats it
    for m in messages[1:]:
        await harness.started(m)
        await harness.result(m)
    resumed = Collector(harness, session.session_id, token=last_event.resume_token)
    final = await harness.run_to_end(session.session_id)
    await asyncio.wait_for(resumed.done.wait(), 5)
    assert not any(i.HasField("snapshot") for i in resumed.items)
    first = watcher.items[0].seq
    assert seen + resumed.seqs() == list(range(first + 1, final.last_seq + 1))
    # An old client's bare seq still resumes the same way.
    legacy = Collector(harness, session.session_id, after=seen[-1])
    await asyncio.wait_for(legacy.done.wait(), 5)
    assert legacy.seqs() == resumed.seqs() and not any(i.HasField("snapshot") for i in legacy.items)


async def test_a_resume_after_an_event_the_database_lost_gets_a_snapshot(harness):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(3)])).session
    watcher = Collector(harness, session.session_id)
    await watcher.until(lambda w: w.items)
    await harness.dispatch()
    await watcher.until(lambda w: len(w.seqs()) >= 3)
    await watcher.close()
    tokens = {i.seq: i.resume_token for i in watcher.items if i.HasField("document")}
    last = max(tokens)
    # The seq the watcher resumes after now names another event.
    await _replace_event(harness, session.session_id, last)
    resumed = Collector(harness, session.session_id, token=tokens[last])
    await resumed.until(lambda w: w.items)
    first = resumed.items[0]
    assert first.HasField("snapshot"), first
    assert first.snapshot.counts.queued == 3 and first.seq == last
    assert first.resume_token != tokens[last]
    await resumed.close()
    # An untouched event's token still resumes with events.
    earlier = Collector(harness, session.session_id, token=tokens[last - 1], heartbeat=0.1)
    await earlier.until(lambda w: w.items)
    assert earlier.items[0].seq == last and not earlier.items[0].HasField("snapshot")
    await earlier.close()
    # A token past the session's last seq (its events were lost, not rewritten).
    async with harness.pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM session.session_events WHERE session_id = $1 AND seq = $2",
            uuid.UUID(session.session_id), last)
        await conn.execute(
            "UPDATE session.import_sessions SET last_seq = last_seq - 1 WHERE session_id = $1",
            uuid.UUID(session.session_id))
    for request in (watch_request(session.session_id, token=tokens[last]),
                    watch_request(session.session_id, after=last)):
        beyond = harness.operator.WatchSession(request)
        item = await asyncio.wait_for(beyond.read(), 5)
        assert item.HasField("snapshot") and item.seq == last - 1
        beyond.cancel()


async def test_a_live_watcher_gets_a_snapshot_when_the_database_goes_back_in_time(harness):
    # Idle: the poll after a heartbeat finds the event it stands on replaced.
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(2)])).session
    idle = Collector(harness, session.session_id, heartbeat=0.1)
    await idle.until(lambda w: w.items)
    await harness.dispatch()
    await idle.until(lambda w: len(w.seqs()) >= 2)
    position = idle.seqs()[-1]
    await _replace_event(harness, session.session_id, position)
    await idle.until(lambda w: w.items[-1].HasField("snapshot"))
    assert idle.items[-1].seq == position
    await idle.close()
    # Between heartbeats: the listener's reconnect finds the tail's last event replaced.
    other = (await harness.create([mfile(f"{i}.pdf") for i in range(2)])).session
    live = Collector(harness, other.session_id, heartbeat=60)
    await live.until(lambda w: w.items)
    await harness.dispatch()
    await live.until(lambda w: len(w.seqs()) >= 2)
    hub = harness.server.hub
    tail = hub._tails[other.session_id]
    assert tail.last_seq == live.seqs()[-1]
    await _replace_event(harness, other.session_id, tail.last_seq)
    async with harness.pool.acquire() as conn:
        await conn.execute("SELECT pg_terminate_backend($1)", hub._conn.get_server_pid())
    await live.until(lambda w: w.items[-1].HasField("snapshot"))
    assert live.items[-1].seq == tail.last_seq
    await live.close()
