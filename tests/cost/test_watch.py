"""WatchCosts: running totals streamed on change, ending when the client cancels."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2 as pb

from services.cost.config import CostSettings

from .conftest import CostHarness
from .helpers import event, new_id, usd


@pytest.fixture
def cost_settings(cost_settings: CostSettings) -> CostSettings:
    # No polling to speak of: updates must come from the change notifications.
    return cost_settings.model_copy(update={"watch_poll_interval": 60.0})


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def known_session(cost: CostHarness, *, units: str = "1") -> str:
    """A session the cost service knows of: its estimate is recorded (as a created session's is)."""
    session = new_id()
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[
        event(session, units=units, kind=pb.COST_KIND_ESTIMATE)]))
    return session


async def test_watch_streams_totals_as_they_change(cost: CostHarness) -> None:
    session = await known_session(cost)
    call = cost.operator.WatchCosts(pb.WatchCostsRequest(session_id=session))
    first = await asyncio.wait_for(call.read(), 5)
    assert (first.session_id, first.actual_total.amount, first.event_count) == (session, "0", 0)
    assert first.estimate_total.amount == "0.0015"
    assert not first.HasField("budget") and first.observed_at.seconds > 0

    started = time.monotonic()
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[event(session, units="2")]))
    second = await asyncio.wait_for(call.read(), 5)
    assert (second.actual_total.amount, second.event_count) == ("0.003", 1)
    assert time.monotonic() - started < 2  # woken by NOTIFY, not by the 60 s poll

    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[
        event(session, units="1", kind=pb.COST_KIND_ESTIMATE, stage=common_pb2.STAGE_CHUNK)]))
    third = await asyncio.wait_for(call.read(), 5)
    assert (third.actual_total.amount, third.estimate_total.amount, third.event_count) == ("0.003", "0.003", 1)

    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("5")))
    fourth = await asyncio.wait_for(call.read(), 5)
    # what the session was charged before it had a budget is spent all the same
    assert fourth.budget.limit.amount == "5" and fourth.budget.spent.amount == "0.003"
    assert fourth.budget.remaining.amount == "4.997"

    # A replay changes nothing, so nothing is sent; another session's events neither.
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[event(session, units="2")]))
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[event(new_id(), units="2")]))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(read := asyncio.ensure_future(call.read())), 0.5)
    await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
        session_id=session, items=[pb.ReservationItem(key="a", amount=usd("1"))]))
    fifth = await asyncio.wait_for(read, 5)
    assert fifth.budget.reserved.amount == "1" and fifth.budget.remaining.amount == "3.997"
    call.cancel()


async def test_a_burst_is_coalesced(cost: CostHarness) -> None:
    session = await known_session(cost)
    call = cost.operator.WatchCosts(pb.WatchCostsRequest(session_id=session))
    await asyncio.wait_for(call.read(), 5)
    for attempt in range(50):
        await cost.service.RecordCosts(pb.RecordCostsRequest(events=[event(session, attempt=attempt)]))
    seen = []
    while not seen or seen[-1].event_count < 50:
        seen.append(await asyncio.wait_for(call.read(), 5))
    assert seen[-1].actual_total.amount == "0.075"
    assert len(seen) < 50
    call.cancel()


async def test_the_stream_ends_when_the_client_cancels(cost: CostHarness) -> None:
    feed = cost.store.changes
    sessions = [new_id() for _ in range(3)]
    for session in sessions:  # known by their budget (recording costs would hold a connection)
        await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("1")))
    calls = [cost.service.WatchCosts(pb.WatchCostsRequest(session_id=s)) for s in sessions]
    for call in calls:
        await asyncio.wait_for(call.read(), 5)
    assert feed.subscriber_count == 3 and feed.listening
    calls[0].cancel()
    await wait_until(lambda: feed.subscriber_count == 2)
    for call in calls[1:]:
        call.cancel()
    await wait_until(lambda: feed.subscriber_count == 0 and not feed.listening)
    with pytest.raises(asyncio.CancelledError):
        await calls[0].read()
    # The LISTEN connection went back to the pool: every pooled connection is idle.
    await wait_until(lambda: cost.pool.get_idle_size() == cost.pool.get_size())


async def test_a_session_the_service_knows_nothing_of_is_not_found_at_once(cost: CostHarness) -> None:
    call = cost.operator.WatchCosts(pb.WatchCostsRequest(session_id=new_id()), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert cost.store.changes.subscriber_count == 0
    # A budget alone makes a session known (the session service sets it at create).
    session = new_id()
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("5")))
    call = cost.operator.WatchCosts(pb.WatchCostsRequest(session_id=session))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.budget.limit.amount == "5" and first.event_count == 0
    call.cancel()


async def test_a_bad_session_id_is_refused(cost: CostHarness) -> None:
    call = cost.operator.WatchCosts(pb.WatchCostsRequest(session_id="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cost.store.changes.subscriber_count == 0


async def test_a_lost_listen_connection_is_replaced(cost: CostHarness, cost_settings: CostSettings) -> None:
    session = await known_session(cost)
    call = cost.operator.WatchCosts(pb.WatchCostsRequest(session_id=session))
    await asyncio.wait_for(call.read(), 5)
    feed = cost.store.changes
    old = feed._conn  # noqa: SLF001 - the test kills it
    pid = await old.fetchval("SELECT pg_backend_pid()")
    await cost.pool.execute("SELECT pg_terminate_backend($1)", pid)
    # The stream is woken by the loss, listens again and re-reads.
    await wait_until(lambda: feed.listening and feed._conn is not old)  # noqa: SLF001
    assert await feed._conn.fetchval("SELECT pg_backend_pid()") != pid  # noqa: SLF001
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[event(session)]))
    update = await asyncio.wait_for(call.read(), 5)
    assert update.event_count == 1
    call.cancel()
