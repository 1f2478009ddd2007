"""Budgets: limits, reservations that never overspend, settlement, release, expiry.

A budget's spent amount is the session's ledger total; an open reservation
holds what its document was not charged yet (services/cost/budgets.py).
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import grpc
import pytest
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2 as pb
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from services.common.errors import details_of

from .conftest import CostHarness
from .helpers import dec, event, new_id, usd, violations

PAGE = Decimal("0.0015")  # aws_textract/ocr_page in the default price book


def items(*amounts: str, prefix: str = "k", documents: list[str] | None = None
          ) -> list[pb.ReservationItem]:
    return [
        pb.ReservationItem(key=f"{prefix}{i}", amount=usd(a),
                           document_id=documents[i] if documents else "")
        for i, a in enumerate(amounts)
    ]


async def charge(cost: CostHarness, session: str, document: str, amount: str,
                 attempt: int = 1) -> None:
    """Records an actual charge of `amount` (a multiple of a Textract page) for a document."""
    pages = Decimal(amount) / PAGE
    assert pages == pages.to_integral_value()
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[
        event(session, document_id=document, attempt=attempt, units=str(int(pages)))]))


async def ledger_invariants(cost: CostHarness, session: str) -> None:
    """The budget agrees with its reservations and its spent amount is the ledger's total."""
    row = await cost.pool.fetchrow(
        "SELECT b.reserved, b.overrun, "
        "  (SELECT coalesce(sum(amount), 0) FROM cost.reservations r WHERE r.session_id = b.session_id"
        "     AND r.state = 'open') AS open_sum, "
        "  (SELECT coalesce(sum(greatest(actual - amount, 0)), 0) FROM cost.reservations r"
        "     WHERE r.session_id = b.session_id AND r.state = 'settled') AS overrun_sum, "
        "  (SELECT coalesce(sum(amount), 0) FROM cost.cost_events e"
        "     WHERE e.session_id = b.session_id AND e.kind = 'actual') AS ledger "
        "FROM cost.budgets b WHERE b.session_id = $1",
        session,
    )
    assert row["reserved"] == row["open_sum"]
    assert row["overrun"] == row["overrun_sum"]
    budget = (await cost.operator.GetBudget(pb.GetBudgetRequest(session_id=session))).budget
    assert dec(budget.spent) == row["ledger"]


async def test_set_and_get_a_budget(cost: CostHarness) -> None:
    session = new_id()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.operator.GetBudget(pb.GetBudgetRequest(session_id=session))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = details_of(caught.value, error_details_pb2.ResourceInfo)
    assert info and info[0].resource_type == "budget" and info[0].resource_name == session

    budget = (await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("250")))).budget
    assert (budget.limit.amount, budget.reserved.amount, budget.spent.amount, budget.remaining.amount) == (
        "250", "0", "0", "250")
    assert budget.updated_at.seconds > 0
    got = (await cost.operator.GetBudget(pb.GetBudgetRequest(session_id=session))).budget
    assert got == budget

    await cost.service.ReserveBudget(pb.ReserveBudgetRequest(session_id=session, items=items("200")))
    lowered = (await cost.operator.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("150")))).budget
    assert (lowered.limit.amount, lowered.reserved.amount, lowered.remaining.amount) == ("150", "200", "0")


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (pb.SetBudgetRequest(session_id="x", limit=usd("1")), {"session_id"}),
        (pb.SetBudgetRequest(session_id=new_id()), {"limit"}),
        (pb.SetBudgetRequest(session_id=new_id(), limit=usd("-1")), {"limit"}),
        (pb.SetBudgetRequest(session_id=new_id(), limit=usd("ten")), {"limit"}),
        (pb.SetBudgetRequest(session_id=new_id(), limit=common_pb2.Money(currency_code="EUR", amount="1")),
         {"limit.currency_code"}),
    ],
)
async def test_bad_budgets_are_refused(cost: CostHarness, request_, fields) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.SetBudget(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(caught.value)) == fields


async def test_a_refused_reservation_names_limit_reserved_and_spent(cost: CostHarness) -> None:
    session, a, b = new_id(), new_id(), new_id()
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("10")))
    first = await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
        session_id=session, items=items("4", "3", documents=[a, b])))
    await charge(cost, session, a, "1.5")
    await cost.service.SettleReservation(pb.SettleReservationRequest(settlements=[
        pb.Settlement(reservation_id=first.reservations[0].reservation_id, actual=usd("1.5"))]))
    # limit 10, reserved 3, spent 1.5: 5.5 remain; 6 does not fit.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.ReserveBudget(pb.ReserveBudgetRequest(session_id=session, items=items("2", "4", prefix="n")))
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (quota,) = details_of(error, error_details_pb2.QuotaFailure)
    (violation,) = quota.violations
    assert violation.subject == f"sessions/{session}/budget"
    for fragment in ("limit 10", "reserved 3", "spent 1.5", "6 more", "5.5 remaining"):
        assert fragment in violation.description
    (info,) = details_of(error, error_details_pb2.ErrorInfo)
    assert info.reason == "RESOURCE_EXHAUSTED"
    assert dict(info.metadata) == {"limit": "10", "reserved": "3", "spent": "1.5", "requested": "6",
                                   "remaining": "5.5", "currency_code": "USD", "session_id": session}
    budget = (await cost.service.GetBudget(pb.GetBudgetRequest(session_id=session))).budget
    assert (budget.reserved.amount, budget.spent.amount) == ("3", "1.5")  # nothing of it was held


async def test_spent_is_the_ledger_and_a_hold_shrinks_as_its_document_is_charged(
    cost: CostHarness,
) -> None:
    """Every charge counts at once, once: a reserved document's, an unreserved one's, and a
    late one of a document already settled (an attempt that was lost, say)."""
    session, doc, other = new_id(), new_id(), new_id()
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("10")))
    granted = await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
        session_id=session, items=items("1", documents=[doc])))
    rid = granted.reservations[0].reservation_id

    async def budget() -> tuple[str, str, str]:
        b = (await cost.operator.GetBudget(pb.GetBudgetRequest(session_id=session))).budget
        return b.reserved.amount, b.spent.amount, b.remaining.amount

    assert await budget() == ("1", "0", "9")
    await charge(cost, session, doc, "0.3")
    assert await budget() == ("0.7", "0.3", "9")  # charged, and held no more for it
    await charge(cost, session, doc, "0.9", attempt=2)  # beyond its estimate
    assert await budget() == ("0", "1.2", "8.8")
    await charge(cost, session, other, "0.15")  # a document without a reservation
    assert await budget() == ("0", "1.35", "8.65")
    settled = await cost.service.SettleReservation(pb.SettleReservationRequest(settlements=[
        pb.Settlement(reservation_id=rid, actual=usd("0.3"))]))  # the caller's view is not the truth
    assert settled.reservations[0].actual.amount == "1.2"
    assert (settled.budget.spent.amount, settled.budget.overrun.amount) == ("1.35", "0.2")
    await charge(cost, session, doc, "0.45", attempt=3)  # a late charge of a settled document
    assert await budget() == ("0", "1.8", "8.2")
    await ledger_invariants(cost, session)


async def test_reserving_a_key_again_returns_the_first_reservation(cost: CostHarness) -> None:
    session = new_id()
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("1")))
    request = pb.ReserveBudgetRequest(session_id=session, items=[
        pb.ReservationItem(key="doc/extract/1", amount=usd("0.6"))])
    first, second = await asyncio.gather(cost.service.ReserveBudget(request), cost.service.ReserveBudget(request))
    assert first.reservations[0].reservation_id == second.reservations[0].reservation_id
    assert first.reservations[0].state == pb.RESERVATION_STATE_OPEN
    budget = (await cost.service.GetBudget(pb.GetBudgetRequest(session_id=session))).budget
    assert budget.reserved.amount == "0.6"


async def test_allow_partial_grants_the_longest_prefix(cost: CostHarness) -> None:
    session = new_id()
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("1")))
    reply = await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
        session_id=session, items=items("0.3", "0.3", "0.5", "0.1"), allow_partial=True))
    assert [r.key for r in reply.reservations] == ["k0", "k1"]
    assert reply.exhausted
    assert (reply.budget.reserved.amount, reply.budget.remaining.amount) == ("0.6", "0.4")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
            session_id=session, items=items("0.5", prefix="x"), allow_partial=True))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    everything = await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
        session_id=session, items=items("0.3", "0.3", "0.4")))
    assert not everything.exhausted and dec(everything.budget.remaining) == 0


async def test_settle_records_overrun_and_is_idempotent(cost: CostHarness) -> None:
    session, doc_a, doc_b = new_id(), new_id(), new_id()
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("10")))
    granted = await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
        session_id=session, items=items("2", "3", documents=[doc_a, doc_b])))
    a, b = (r.reservation_id for r in granted.reservations)
    await charge(cost, session, doc_a, "2.7")
    await charge(cost, session, doc_b, "1.5")
    settle = pb.SettleReservationRequest(settlements=[
        pb.Settlement(reservation_id=a, actual=usd("2.7")), pb.Settlement(reservation_id=b, actual=usd("1.5"))])
    first = await cost.service.SettleReservation(settle)
    assert [(r.state, r.actual.amount) for r in first.reservations] == [
        (pb.RESERVATION_STATE_SETTLED, "2.7"), (pb.RESERVATION_STATE_SETTLED, "1.5")]
    budget = first.budget
    assert (budget.reserved.amount, budget.spent.amount, budget.overrun.amount, budget.remaining.amount) == (
        "0", "4.2", "0.7", "5.8")
    again = await cost.service.SettleReservation(settle)
    assert again.reservations == first.reservations and again.budget.spent.amount == "4.2"
    # settled is settled: another figure changes nothing either
    other = await cost.service.SettleReservation(pb.SettleReservationRequest(settlements=[
        pb.Settlement(reservation_id=a, actual=usd("9"))]))
    assert other.reservations[0].actual.amount == "2.7" and other.budget == again.budget

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.ReleaseReservation(pb.ReleaseReservationRequest(reservation_ids=[a]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    (failure,) = details_of(caught.value, error_details_pb2.PreconditionFailure)
    assert failure.violations[0].subject == f"reservations/{a}"
    await ledger_invariants(cost, session)


async def test_release_gives_the_amount_back(cost: CostHarness) -> None:
    session = new_id()
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("1")))
    granted = await cost.service.ReserveBudget(pb.ReserveBudgetRequest(session_id=session, items=items("1")))
    rid = granted.reservations[0].reservation_id
    released = await cost.service.ReleaseReservation(pb.ReleaseReservationRequest(reservation_ids=[rid, rid]))
    assert released.budget.spent.amount == "0"
    assert [r.state for r in released.reservations] == [pb.RESERVATION_STATE_RELEASED]
    assert released.budget.remaining.amount == "1"
    again = await cost.service.ReleaseReservation(pb.ReleaseReservationRequest(reservation_ids=[rid]))
    assert again.budget.remaining.amount == "1"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.SettleReservation(pb.SettleReservationRequest(settlements=[
            pb.Settlement(reservation_id=rid, actual=usd("1"))]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await ledger_invariants(cost, session)


async def test_closing_unknown_or_mixed_reservations_is_refused(cost: CostHarness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.ReleaseReservation(pb.ReleaseReservationRequest(reservation_ids=[new_id()]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    ids = []
    for _ in range(2):
        session = new_id()
        await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("1")))
        ids.append((await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
            session_id=session, items=items("1")))).reservations[0].reservation_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.ReleaseReservation(pb.ReleaseReservationRequest(reservation_ids=ids))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for request_, field in [
        (pb.SettleReservationRequest(), "settlements"),
        (pb.SettleReservationRequest(settlements=[pb.Settlement(reservation_id=ids[0])]), "settlements[0].actual"),
        (pb.SettleReservationRequest(settlements=[pb.Settlement(reservation_id="x", actual=usd("1"))]),
         "settlements[0].reservation_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cost.service.SettleReservation(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in violations(caught.value)


async def test_reserving_without_a_budget_or_with_bad_items(cost: CostHarness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.ReserveBudget(pb.ReserveBudgetRequest(session_id=new_id(), items=items("1")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # A negative duration breaks the rules of every request (services.common.validate):
    # refused before the method's own checks run.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
            session_id=new_id(), items=[pb.ReservationItem(amount=usd("-1"), document_id="doc 7")],
            ttl=duration_pb2.Duration(seconds=-5)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(caught.value)) == {"ttl"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
            session_id=new_id(), items=[pb.ReservationItem(amount=usd("-1"), document_id="doc 7")],
            ttl=duration_pb2.Duration(seconds=8 * 24 * 3600)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(caught.value)) == {
        "items[0].key", "items[0].amount", "items[0].document_id", "ttl"}


async def test_unsettled_reservations_expire(cost: CostHarness) -> None:
    session, doc_a, doc_b = new_id(), new_id(), new_id()
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("1")))
    short = duration_pb2.Duration(nanos=300_000_000)
    granted = await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
        session_id=session, items=items("0.6", "0.4", documents=[doc_a, doc_b]), ttl=short))
    a, b = (r.reservation_id for r in granted.reservations)
    assert granted.budget.remaining.amount == "0"
    await asyncio.sleep(0.5)
    # Reads stop counting them at once, before anything marks them.
    budget = (await cost.operator.GetBudget(pb.GetBudgetRequest(session_id=session))).budget
    assert (budget.reserved.amount, budget.remaining.amount) == ("0", "1")
    # A write path marks them expired; the work still done is spent, and can be settled.
    await charge(cost, session, doc_a, "0.69")
    settled = await cost.service.SettleReservation(pb.SettleReservationRequest(settlements=[
        pb.Settlement(reservation_id=a, actual=usd("0.69"))]))
    assert settled.reservations[0].state == pb.RESERVATION_STATE_SETTLED
    assert (settled.budget.reserved.amount, settled.budget.spent.amount, settled.budget.overrun.amount) == (
        "0", "0.69", "0.09")
    released = await cost.service.ReleaseReservation(pb.ReleaseReservationRequest(reservation_ids=[b]))
    assert released.reservations[0].state == pb.RESERVATION_STATE_EXPIRED
    await ledger_invariants(cost, session)
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # 0.31 remain
        await cost.service.ReserveBudget(pb.ReserveBudgetRequest(session_id=session, items=items("0.32", prefix="n")))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fresh = await cost.service.ReserveBudget(pb.ReserveBudgetRequest(session_id=session, items=items("0.31", prefix="n")))
    assert fresh.budget.remaining.amount == "0"


async def test_the_sweep_marks_overdue_reservations(cost: CostHarness) -> None:
    sessions = [new_id() for _ in range(3)]
    for session in sessions:
        await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd("5")))
        await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
            session_id=session, items=items("1", "2"), ttl=duration_pb2.Duration(nanos=100_000_000)))
    await asyncio.sleep(0.2)
    assert await cost.store.expire_reservations() == 3
    assert await cost.store.expire_reservations() == 0
    for session in sessions:
        await ledger_invariants(cost, session)
        assert await cost.pool.fetchval("SELECT reserved FROM cost.budgets WHERE session_id = $1", session) == 0
    states = await cost.pool.fetch("SELECT DISTINCT state FROM cost.reservations")
    assert [r["state"] for r in states] == ["expired"]


async def test_twenty_concurrent_reservers_never_overspend(cost: CostHarness) -> None:
    session = new_id()
    limit = Decimal("10")
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd(limit)))
    problems: list[str] = []
    done = asyncio.Event()
    checks = 0

    def check(where: str, reserved: Decimal, spent: Decimal) -> None:
        if reserved + spent > limit:
            problems.append(f"{where}: reserved {reserved} + spent {spent} > {limit}")

    async def checker() -> None:
        nonlocal checks
        while not done.is_set():
            budget = (await cost.operator.GetBudget(pb.GetBudgetRequest(session_id=session))).budget
            check("GetBudget", dec(budget.reserved), dec(budget.spent))
            checks += 1
            await asyncio.sleep(0)

    granted_total = Decimal(0)
    refusals = 0
    documents: dict[tuple[int, int], str] = {}

    async def reserver(n: int) -> None:
        nonlocal granted_total, refusals
        rng = random.Random(n)
        stub = cost.stub(cost.settings.service_tokens[0])
        misses = 0
        i = 0
        while misses < 5:
            i += 1
            amount = Decimal(rng.randint(1, 60)) / 100
            documents[n, i] = new_id()
            try:
                reply = await stub.ReserveBudget(pb.ReserveBudgetRequest(
                    session_id=session, items=[pb.ReservationItem(
                        key=f"r{n}/{i}", amount=usd(amount), document_id=documents[n, i])]))
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refusals += 1
                misses += 1
                continue
            check(f"reserver {n}", dec(reply.budget.reserved), dec(reply.budget.spent))
            granted_total += amount
            (reservation,) = reply.reservations
            if rng.random() < 0.5:
                # Charged at or under the reservation: no overrun, so the limit is a hard cap.
                pages = int(amount * Decimal(rng.randint(0, 100)) / 100 / PAGE)
                await stub.RecordCosts(pb.RecordCostsRequest(events=[
                    event(session, document_id=documents[n, i], units=str(pages))]))
                actual = pages * PAGE
                closed = await stub.SettleReservation(pb.SettleReservationRequest(settlements=[
                    pb.Settlement(reservation_id=reservation.reservation_id, actual=usd(actual))]))
            else:
                closed = await stub.ReleaseReservation(pb.ReleaseReservationRequest(
                    reservation_ids=[reservation.reservation_id]))
            check(f"reserver {n} close", dec(closed.budget.reserved), dec(closed.budget.spent))

    watch = asyncio.create_task(checker())
    await asyncio.gather(*(reserver(n) for n in range(20)))
    done.set()
    await watch
    assert problems == []
    assert checks > 10 and refusals == 100 and granted_total > limit
    budget = (await cost.operator.GetBudget(pb.GetBudgetRequest(session_id=session))).budget
    assert dec(budget.reserved) == 0 and dec(budget.spent) <= limit
    await ledger_invariants(cost, session)
