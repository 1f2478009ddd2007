"""Property tests: ledger and budget totals are the exact Decimal sums of what went in."""

from __future__ import annotations

import decimal
from decimal import Decimal

from docimport.cost.v1 import cost_service_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import CPU_RATE, CostHarness
from .helpers import dec, event, new_id, usd

OPERATIONS = [("svc_a", "op_a"), ("svc_a", "op_b"), ("svc_b", "op_a"), ("svc_c", "op_c")]

prices = st.lists(
    st.decimals(min_value=0, max_value=1000, places=8, allow_nan=False, allow_infinity=False),
    min_size=len(OPERATIONS), max_size=len(OPERATIONS),
)
entries = st.lists(
    st.tuples(
        st.integers(0, len(OPERATIONS) - 1),
        st.decimals(min_value=0, max_value=10**9, places=8, allow_nan=False, allow_infinity=False),
        st.booleans(),  # cache hit
        st.booleans(),  # estimate
    ),
    min_size=1, max_size=60,
)
# The test's own sums must not round either (the default context keeps 28 digits).
EXACT = decimal.Context(prec=100, traps=[decimal.Inexact])

PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(unit_prices=prices, rows=entries, split=st.integers(1, 60))
async def test_ledger_totals_are_exact_decimal_sums(cost: CostHarness, unit_prices, rows, split) -> None:
    book = pb.PriceBook(name="property", prices=[
        pb.Price(service=s, operation=o, unit="unit", unit_price=usd(p))
        for (s, o), p in zip(OPERATIONS, unit_prices, strict=True)
    ])
    version = (await cost.operator.PublishPriceBook(pb.PublishPriceBookRequest(price_book=book))).price_book.version
    session = new_id()
    events = []
    for i, (op, units, cache_hit, estimate) in enumerate(rows):
        service, operation = OPERATIONS[op]
        events.append(event(
            session, document_id=new_id(), attempt=i, service=service, operation=operation, units=str(units),
            cache_hit=cache_hit, kind=pb.COST_KIND_ESTIMATE if estimate else pb.COST_KIND_ACTUAL,
            price_book_version=version,
        ))
    recorded = []
    for start in range(0, len(events), split):
        reply = await cost.service.RecordCosts(pb.RecordCostsRequest(events=events[start:start + split]))
        recorded.extend(reply.events)

    decimal.setcontext(EXACT)
    expected = {"actual": Decimal(0), "estimate": Decimal(0), "saved": Decimal(0)}
    by_service: dict[str, Decimal] = {}
    for (op, units, cache_hit, estimate), got in zip(rows, recorded, strict=True):
        amount = units * unit_prices[op]
        if cache_hit:
            assert dec(got.amount) == 0 and dec(got.saved) == amount
        else:
            assert dec(got.amount) == amount and dec(got.saved) == 0
        if cache_hit and not estimate:
            expected["saved"] += amount
        if not cache_hit:
            expected["estimate" if estimate else "actual"] += amount
            if not estimate:
                service = OPERATIONS[op][0]
                by_service[service] = by_service.get(service, Decimal(0)) + amount

    costs = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session))
    assert dec(costs.actual_total) == expected["actual"]
    assert dec(costs.estimate_total) == expected["estimate"]
    assert dec(costs.cache_savings) == expected["saved"]
    assert {t.key: dec(t.amount) for t in costs.by_service if dec(t.amount)} == {
        k: v for k, v in by_service.items() if v
    }


amounts = st.decimals(min_value=0, max_value=10**6, places=8, allow_nan=False, allow_infinity=False)


units = st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False, allow_infinity=False)


@PROPERTY
@given(reserve=st.lists(st.tuples(amounts, units, st.booleans()), min_size=1, max_size=30))
async def test_budget_spent_is_the_exact_sum_of_the_ledger(cost: CostHarness, reserve) -> None:
    """Whatever becomes of the reservations (settled or released), the budget's spent amount
    is every charge of the ledger, exactly, and a settled reservation's actual its document's."""
    session = new_id()
    decimal.setcontext(EXACT)
    total_reserved = sum((r for r, _, _ in reserve), Decimal(0))
    documents = [new_id() for _ in reserve]
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd(total_reserved)))
    granted = await cost.service.ReserveBudget(pb.ReserveBudgetRequest(
        session_id=session,
        items=[pb.ReservationItem(key=f"k{i}", amount=usd(r), document_id=documents[i])
               for i, (r, _, _) in enumerate(reserve)],
    ))
    assert dec(granted.budget.reserved) == total_reserved
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[
        event(session, document_id=documents[i], service="local", operation="compute_second",
              units=str(u))
        for i, (_, u, _) in enumerate(reserve)
    ]))
    charged = [u * CPU_RATE for _, u, _ in reserve]
    settle = [i for i, (_, _, do) in enumerate(reserve) if do]
    release = [i for i, (_, _, do) in enumerate(reserve) if not do]
    budget = granted.budget
    if settle:
        closed = await cost.service.SettleReservation(pb.SettleReservationRequest(settlements=[
            pb.Settlement(reservation_id=granted.reservations[i].reservation_id, actual=usd(0))
            for i in settle
        ]))
        assert [dec(r.actual) for r in closed.reservations] == [charged[i] for i in settle]
        budget = closed.budget
    if release:
        budget = (await cost.service.ReleaseReservation(pb.ReleaseReservationRequest(
            reservation_ids=[granted.reservations[i].reservation_id for i in release]))).budget
    assert dec(budget.reserved) == 0
    assert dec(budget.spent) == sum(charged, Decimal(0))
    assert dec(budget.overrun) == sum(
        (max(charged[i] - reserve[i][0], Decimal(0)) for i in settle), Decimal(0))
    assert dec(budget.remaining) == max(total_reserved - dec(budget.spent), Decimal(0))
