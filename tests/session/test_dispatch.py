"""The dispatcher: caps, priority, SKIP LOCKED between replicas, publish failures, messages."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

from docimport.session.v1 import session_service_pb2 as pb

from services.common import db
from services.session.dispatcher import Dispatcher
from services.session.store import SessionStore

from .helpers import RecordingEnqueuer, mfile, tune


async def test_per_session_cap(harness):
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(5)], max_in_flight=2)).session
    first = await harness.dispatch()
    assert len(first) == 2
    assert await harness.dispatch() == []
    await harness.started(first[0])
    await harness.result(first[0])  # extract done: the document goes on to chunk first
    [nxt] = await harness.dispatch()
    assert nxt.payload.document_id == first[0].payload.document_id and nxt.payload.stage == "chunk"
    s = (
        await harness.operator.GetSession(pb.GetSessionRequest(session_id=session.session_id))
    ).session
    assert s.counts.queued == 2 and s.counts.pending == 3


async def test_a_session_without_a_cap_gets_the_services_default(harness):
    tune(harness, default_max_in_flight=3)
    session = (await harness.create([mfile(f"{i}.pdf") for i in range(5)])).session
    assert session.options.max_in_flight == 3
    assert len(await harness.dispatch()) == 3
    assert await harness.dispatch() == []
    own = (await harness.create([mfile(f"x{i}.pdf") for i in range(5)], max_in_flight=4)).session
    assert own.options.max_in_flight == 4


async def test_a_session_is_topped_up_in_batches_unless_its_queue_runs_low(harness):
    # cap 8, top-up a quarter: a round once 2 slots are free, or once fewer than 2 runs are queued
    await harness.create([mfile(f"{i}.pdf") for i in range(20)], max_in_flight=8)
    first = await harness.dispatch()
    assert len(first) == 8
    await harness.started(first[0])
    await harness.result(first[0])  # one slot free, 7 still queued: no round for one
    assert await harness.dispatch() == []
    await harness.started(first[1])
    await harness.result(first[1])  # two free: a round of two (both documents' next stage)
    second = await harness.dispatch()
    assert sorted((m.payload.document_id, m.payload.stage) for m in second) == (
        sorted((m.payload.document_id, "chunk") for m in first[:2])
    )
    # now every queued run starts: the queue is empty and one free slot is worth a round
    for m in first[2:] + second:
        await harness.started(m)
    await harness.result(first[2])
    [low] = await harness.dispatch()
    assert (low.payload.document_id, low.payload.stage) == (first[2].payload.document_id, "chunk")


async def test_overall_cap_across_sessions(harness):
    tune(harness, max_in_flight_total=3)
    await harness.create([mfile(f"a{i}.pdf") for i in range(5)])
    await harness.create([mfile(f"b{i}.pdf") for i in range(5)])
    assert len(await harness.dispatch()) == 3
    assert await harness.dispatch() == []


async def test_category_priority_then_manifest_priority(harness):
    files = [
        mfile("c/1.pdf", category="correspondence", priority=40),
        mfile("p/1.pdf", category="pleadings", priority=10),
        mfile("m/1.pdf", category="medical_records", priority=20),
        mfile("p/2.pdf", category="pleadings", priority=10),
        mfile("d/1.pdf", category="discovery", priority=30),
    ]
    await harness.create(files, priority=["Discovery", "correspondence"], max_in_flight=1)
    order = []
    while messages := await harness.dispatch():
        [m] = messages  # one in flight: a document finishes before the next starts
        if m.payload.stage == "extract":
            order.append(m.payload.relative_path)
        await harness.result(m)
    assert order == ["d/1.pdf", "c/1.pdf", "p/1.pdf", "p/2.pdf", "m/1.pdf"]


async def test_two_dispatchers_never_dispatch_a_document_twice(harness, db_url):
    n = 3000
    tune(harness, max_in_flight_total=10 * n, dispatch_batch=250)
    await harness.create([mfile(f"{i}.pdf") for i in range(n)], max_in_flight=n)
    await harness.create([mfile(f"x{i}.pdf") for i in range(n)], max_in_flight=n)
    pools = [await db.create_pool(db_url, min_size=2, max_size=4) for _ in range(2)]
    stores = [SessionStore(p) for p in pools]
    try:
        enqueuers = [RecordingEnqueuer(), RecordingEnqueuer()]
        dispatchers = [
            Dispatcher(s, e, harness.settings) for s, e in zip(stores, enqueuers, strict=True)
        ]

        async def drain(d: Dispatcher) -> None:
            while await d.run_once():
                pass

        await asyncio.gather(*(drain(d) for d in dispatchers))
    finally:
        for store in stores:
            await store.close()  # its held connections go back before the pool closes
        for p in pools:
            await p.close()
    published = [m for e in enqueuers for m in e.messages]
    assert all(e.messages for e in enqueuers), "both replicas should have done some of the work"
    docs = [m.payload.document_id for m in published]
    assert len(docs) == 2 * n and len(set(docs)) == 2 * n
    async with harness.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM session.stage_runs") == 2 * n
        assert (
            await conn.fetchval("SELECT count(DISTINCT task_id) FROM session.stage_runs") == 2 * n
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM session.session_documents WHERE state = 'queued'"
            )
            == 2 * n
        )
        drift = await conn.fetchval(
            "SELECT count(*) FROM session.import_sessions WHERE count_queued <> total_documents"
        )
        assert drift == 0


async def test_failed_publish_puts_runs_back_without_counting_the_attempt(harness):
    await harness.create([mfile("a.pdf"), mfile("b.pdf")])
    harness.enqueuer.fail = True
    assert await harness.dispatch() == []
    async with harness.pool.acquire() as conn:
        rows = await conn.fetch("SELECT state, attempts FROM session.session_documents")
        assert {(r["state"], r["attempts"]) for r in rows} == {("pending", 0)}
        await conn.execute("UPDATE session.session_documents SET not_before = NULL")
    harness.enqueuer.fail = False
    messages = await harness.dispatch()
    assert len(messages) == 2 and {m.payload.attempt for m in messages} == {2}


async def test_messages_carry_the_recorded_task_id_and_scaled_limits(harness):
    small, big = mfile("small.pdf", size=1000), mfile("big.pdf", size=500 * 1024 * 1024)
    await harness.create([small, big])
    messages = {m.payload.relative_path: m for m in await harness.dispatch()}
    assert messages["big.pdf"].time_limit > messages["small.pdf"].time_limit
    assert messages["big.pdf"].soft_time_limit < messages["big.pdf"].time_limit
    async with harness.pool.acquire() as conn:
        for m in messages.values():
            row = await conn.fetchrow(
                "SELECT task_id, lease_expires_at FROM session.stage_runs WHERE document_id = $1",
                uuid.UUID(m.payload.document_id),
            )
            assert row["task_id"] == m.task_id
            # a short lease (renewed while the run is seen alive), which is also until when a
            # worker may start the run unasked; the message itself lives for queue_wait
            lease = row["lease_expires_at"]
            assert m.payload.start_unasked_until == lease.isoformat()
            settings = harness.settings
            assert m.expires_at - lease == dt.timedelta(
                seconds=settings.queue_wait - settings.lease_ttl
            )
    p = messages["small.pdf"].payload
    assert p.source_path == "/data/case" and p.raw_path == b"small.pdf" and p.plan == "text_layer"
