"""The cost ledger: idempotent RecordCosts, exact totals, session aggregates, listing."""

from __future__ import annotations

import asyncio
import random
import re
from decimal import Decimal

import asyncpg
import grpc
import pytest
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2 as pb

from conftest import racing

from .conftest import CPU_RATE, CostHarness
from .helpers import dec, event, new_id, violations
from .test_price_book import SMALL_BOOK


def _without_replay_count(reply: pb.RecordCostsResponse) -> pb.RecordCostsResponse:
    copy = pb.RecordCostsResponse()
    copy.CopyFrom(reply)
    copy.replayed_count = 0
    return copy


async def test_record_prices_each_event_and_a_replay_answers_as_the_first_call(cost: CostHarness) -> None:
    session, doc = new_id(), new_id()
    request = pb.RecordCostsRequest(events=[
        event(session, document_id=doc, units="3", category="pleadings"),
        event(session, document_id=doc, service="local", operation="compute_second", units="1.2345"),
        event(session, document_id=doc, stage=common_pb2.STAGE_CHUNK, service="local",
              operation="compute_second", units="0.5", cache_hit=True),
    ])
    first = await cost.service.RecordCosts(request)
    assert first.replayed_count == 0
    ocr, cpu, cached = first.events
    assert (ocr.unit_price.amount, ocr.amount.amount, ocr.price_book_version) == ("0.0015", "0.0045", 1)
    assert dec(cpu.amount) == Decimal("1.2345") * CPU_RATE
    assert (cached.amount.amount, dec(cached.saved)) == ("0", Decimal("0.5") * CPU_RATE)
    assert ocr.kind == pb.COST_KIND_ACTUAL and ocr.category == "pleadings"
    assert ocr.event_id and ocr.recorded_at.seconds and ocr.occurred_at.seconds
    assert dec(first.total) == Decimal("0.0045") + Decimal("1.2345") * CPU_RATE

    # The replay changes nothing, whatever else it says, and answers identically.
    changed = pb.RecordCostsRequest()
    changed.CopyFrom(request)
    changed.events[0].units = "999"
    replay = await cost.service.RecordCosts(changed)
    assert replay.replayed_count == 3
    assert _without_replay_count(replay) == first

    costs = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session))
    assert dec(costs.actual_total) == dec(first.total)
    assert costs.event_count == 3 and costs.cache_hits == 1
    assert dec(costs.cache_savings) == Decimal("0.5") * CPU_RATE
    assert costs.by_service and costs.top_documents

    # Totals only (what GetSession polls): the same totals, no breakdowns.
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[
        event(session, document_id=doc, attempt=2, kind=pb.COST_KIND_ESTIMATE)]))
    full = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session))
    totals = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session, totals_only=True))
    assert dec(full.estimate_total) > 0
    assert (totals.actual_total, totals.estimate_total, totals.event_count) == (
        full.actual_total, full.estimate_total, full.event_count)
    assert not totals.by_service and not totals.top_documents and not totals.price_book_versions


async def test_a_new_attempt_or_kind_is_a_new_event(cost: CostHarness) -> None:
    session, doc = new_id(), new_id()
    reply = await cost.service.RecordCosts(pb.RecordCostsRequest(events=[
        event(session, document_id=doc, attempt=1),
        event(session, document_id=doc, attempt=2),
        event(session, document_id=doc, attempt=1, kind=pb.COST_KIND_ESTIMATE),
        event(session, document_id=doc, attempt=1),  # the same key again in one request
    ]))
    assert reply.replayed_count == 1
    assert len({e.event_id for e in reply.events}) == 3
    assert reply.events[3] == reply.events[0]
    assert dec(reply.total) == Decimal("0.0045")


async def test_replaying_every_call_twice_in_shuffled_order_leaves_identical_totals(cost: CostHarness) -> None:
    rng = random.Random(1234)
    session = new_id()
    docs = [new_id() for _ in range(25)]
    operations = [("aws_textract", "ocr_page"), ("local", "compute_second"), ("openai", "input_tokens_1k"),
                  ("openai", "output_tokens_1k"), ("s3", "put_request")]
    calls = []
    for _ in range(40):
        batch = []
        for _ in range(rng.randint(1, 30)):
            service, operation = rng.choice(operations)
            batch.append(event(
                session, document_id=rng.choice(docs), stage=rng.choice([1, 2, 3]), attempt=rng.randint(1, 3),
                service=service, operation=operation, units=str(Decimal(rng.randint(0, 10**9)) / 10**6),
                kind=rng.choice([pb.COST_KIND_ACTUAL, pb.COST_KIND_ACTUAL, pb.COST_KIND_ESTIMATE]),
                category=rng.choice(["pleadings", "discovery", ""]), cache_hit=rng.random() < 0.1,
            ))
        calls.append(pb.RecordCostsRequest(events=batch))

    firsts = [await cost.service.RecordCosts(call) for call in calls]
    before = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session, top_documents=100))

    replays = [i for i in range(len(calls)) for _ in range(2)]
    rng.shuffle(replays)
    answers = await asyncio.gather(*(cost.service.RecordCosts(calls[i]) for i in replays))
    for i, answer in zip(replays, answers, strict=True):
        assert answer.replayed_count == len(calls[i].events)
        assert _without_replay_count(answer) == _without_replay_count(firsts[i])

    after = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session, top_documents=100))
    assert after == before
    distinct = {e.event_id: e for reply in firsts for e in reply.events}
    actual = [e for e in distinct.values() if e.kind == pb.COST_KIND_ACTUAL]
    assert dec(after.actual_total) == sum((dec(e.amount) for e in actual), Decimal(0))
    assert after.event_count == len(actual)
    rows = await cost.pool.fetchval("SELECT count(*) FROM cost.cost_events WHERE session_id = $1", session)
    assert rows == len(distinct)


async def test_totals_only_equal_the_ledger_while_folds_race_the_writes(cost: CostHarness) -> None:
    # Totals only reads the folded per-session totals plus the deltas not folded yet;
    # the full answer sums the events themselves.
    rng = random.Random(99)
    session = new_id()
    calls = [
        pb.RecordCostsRequest(events=[
            event(session, document_id=new_id(), units=str(Decimal(rng.randint(0, 10**9)) / 10**6),
                  kind=rng.choice([pb.COST_KIND_ACTUAL, pb.COST_KIND_ESTIMATE]), cache_hit=rng.random() < 0.1)
            for _ in range(rng.randint(1, 20))
        ])
        for _ in range(60)
    ]

    async def same_totals() -> None:
        totals = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session, totals_only=True))
        full = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session))
        assert (totals.actual_total, totals.estimate_total, totals.event_count) == (
            full.actual_total, full.estimate_total, full.event_count)
        assert dec(full.actual_total) > 0 and dec(full.estimate_total) > 0

    writes = asyncio.gather(*(cost.service.RecordCosts(call) for call in calls + calls))  # each replayed once
    assert await racing(writes, cost.store.fold_totals) > 1
    await same_totals()
    await cost.store.fold_totals()
    assert await cost.pool.fetchval("SELECT count(*) FROM cost.session_total_deltas") == 0
    await same_totals()


async def test_session_costs_group_by_every_dimension(cost: CostHarness) -> None:
    session, a, b = new_id(), new_id(), new_id()
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[
        event(session, document_id=a, units="10", category="discovery"),                       # 0.015
        event(session, document_id=a, stage=2, service="local", operation="compute_second",
              units="2", category="discovery"),                                                # 0.00004
        event(session, document_id=b, units="2", category="pleadings"),                        # 0.003
        event(session, document_id=b, stage=3, service="openai", operation="output_tokens_1k",
              units="5", category="pleadings", cache_hit=True),                                # saves 0.003
        event(session, document_id=a, units="12", kind=pb.COST_KIND_ESTIMATE),                 # 0.018
        event(session, stage=0, service="s3", operation="storage_gb_month", units="1.5"),      # 0.0345
    ]))
    await cost.operator.PublishPriceBook(pb.PublishPriceBookRequest(toml=SMALL_BOOK))
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[
        event(session, document_id=b, attempt=2, units="1", category="pleadings"),             # 0.002 (v2)
    ]))
    costs = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session, top_documents=1))
    assert dec(costs.actual_total) == Decimal("0.015") + Decimal("0.00004") + Decimal("0.003") + \
        Decimal("0.0345") + Decimal("0.002")
    assert dec(costs.estimate_total) == Decimal("0.018")
    assert {t.key: dec(t.amount) for t in costs.by_service} == {
        "aws_textract": Decimal("0.02"), "local": Decimal("0.00004"), "openai": Decimal(0),
        "s3": Decimal("0.0345"),
    }
    ops = {t.key: t for t in costs.by_operation}
    assert Decimal(ops["aws_textract/ocr_page"].units) == 13
    assert ops["aws_textract/ocr_page"].event_count == 3
    assert (ops["s3/storage_gb_month"].service, ops["s3/storage_gb_month"].operation) == ("s3", "storage_gb_month")
    stages = {t.stage: dec(t.amount) for t in costs.by_stage}
    assert stages == {common_pb2.STAGE_EXTRACT: Decimal("0.02"), common_pb2.STAGE_CHUNK: Decimal("0.00004"),
                      common_pb2.STAGE_ENTITIES: Decimal(0), common_pb2.STAGE_UNSPECIFIED: Decimal("0.0345")}
    assert {t.key: dec(t.amount) for t in costs.by_category} == {
        "discovery": Decimal("0.01504"), "pleadings": Decimal("0.005"), "": Decimal("0.0345"),
    }
    assert [(d.document_id, d.category, dec(d.amount)) for d in costs.top_documents] == [
        (a, "discovery", Decimal("0.01504"))
    ]
    assert {t.key: dec(t.amount) for t in costs.estimate_by_service} == {"aws_textract": Decimal("0.018")}
    assert (costs.cache_hits, dec(costs.cache_savings)) == (1, Decimal("0.003"))
    assert list(costs.price_book_versions) == [1, 2]
    assert [t.key for t in costs.by_service][0] == "s3"  # largest first


async def test_an_unknown_session_has_zero_costs(cost: CostHarness) -> None:
    costs = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=new_id()))
    assert (costs.actual_total.amount, costs.event_count, list(costs.by_service)) == ("0", 0, [])


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (dict(session_id="not-a-uuid"), "events[0].session_id"),
        (dict(session_id=""), "events[0].session_id"),
        (dict(document_id="x"), "events[0].document_id"),
        (dict(units="1.123456789"), "events[0].units"),
        (dict(units="-1"), "events[0].units"),
        (dict(units="1e30"), "events[0].units"),
        (dict(units=""), "events[0].units"),
        (dict(kind=pb.COST_KIND_UNSPECIFIED), "events[0].kind"),
        (dict(service="nobody"), "events[0].operation"),
        (dict(operation=""), "events[0].operation"),
        (dict(attempt=-1), "events[0].attempt"),
        (dict(stage=42), "events[0].stage"),
        (dict(price_book_version=77), "events[0].price_book_version"),
        (dict(category="x" * 201), "events[0].category"),
    ],
)
async def test_bad_events_are_refused_naming_the_field(cost: CostHarness, bad: dict, field: str) -> None:
    fields = dict(session_id=new_id(), document_id=new_id())
    fields.update(bad)
    session_id = fields.pop("session_id")
    good = event(new_id())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.RecordCosts(pb.RecordCostsRequest(events=[event(session_id, **fields), good]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(caught.value), violations(caught.value)
    # Nothing of a refused batch is recorded.
    assert await cost.pool.fetchval("SELECT count(*) FROM cost.cost_events") == 0


async def test_oversized_batches_and_many_problems_are_bounded(cost: CostHarness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.RecordCosts(pb.RecordCostsRequest(events=[event(new_id())] * 10_001))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.RecordCosts(pb.RecordCostsRequest(events=[event("bad")] * 500))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # As many problems as fit a trailer are listed; the rest are counted, all 500 of them.
    listed = violations(caught.value)
    more = int(re.search(r"and ([\d,]+) more problems", caught.value.details())[1].replace(",", ""))
    assert listed[""] == f"... and {more:,} more problems"
    assert 5 <= len(listed) - 1 <= 50 and len(listed) - 1 + more == 500
    empty = await cost.service.RecordCosts(pb.RecordCostsRequest())
    assert (len(empty.events), empty.total.amount) == (0, "0")


async def test_the_database_refuses_a_rounded_amount(cost: CostHarness) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await cost.pool.execute(
            "INSERT INTO cost.cost_events (event_id, session_id, service, operation, kind, units, unit_price,"
            " amount, price_book_version) VALUES (gen_random_uuid(), gen_random_uuid(), 'local',"
            " 'compute_second', 'actual', 1.5, 0.00001389, 0.00002, 1)"
        )
    assert caught.value.constraint_name == "cost_events_amount_exact_check"


async def test_list_cost_events_pages_through_filters(cost: CostHarness) -> None:
    session, doc = new_id(), new_id()
    batch = [event(session, document_id=doc if i % 2 else new_id(), attempt=i,
                   kind=pb.COST_KIND_ESTIMATE if i % 5 == 0 else pb.COST_KIND_ACTUAL) for i in range(1, 31)]
    for start in range(0, 30, 7):
        await cost.service.RecordCosts(pb.RecordCostsRequest(events=batch[start:start + 7]))
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[event(new_id())]))  # another session

    async def all_pages(**filters) -> list[pb.CostEvent]:
        seen, token = [], ""
        while True:
            page = await cost.operator.ListCostEvents(
                pb.ListCostEventsRequest(page_size=4, page_token=token, **filters))
            seen.extend(page.events)
            token = page.next_page_token
            if not token:
                return seen

    everything = await all_pages(session_id=session)
    assert len(everything) == 30 and len({e.event_id for e in everything}) == 30
    assert [(e.recorded_at.ToDatetime(), e.event_id) for e in everything] == sorted(
        (e.recorded_at.ToDatetime(), e.event_id) for e in everything)
    assert len(await all_pages(session_id=session, document_id=doc)) == 15
    assert len(await all_pages(session_id=session, kind=pb.COST_KIND_ESTIMATE)) == 6
    assert len(await all_pages(session_id=session, stage=common_pb2.STAGE_CHUNK)) == 0
    assert len(await all_pages(session_id=session, service="aws_textract", stage=1)) == 30
    assert len(await all_pages(document_id=doc)) == 15
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await all_pages(service="aws_textract")  # would sort the whole ledger
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "session_id" in violations(caught.value)

    page = await cost.operator.ListCostEvents(pb.ListCostEventsRequest(session_id=session, page_size=4))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.operator.ListCostEvents(pb.ListCostEventsRequest(
            session_id=session, document_id=doc, page_token=page.next_page_token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in violations(caught.value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.operator.ListCostEvents(pb.ListCostEventsRequest(session_id="nope", page_size=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_100000_events_of_a_fifteenth_of_a_cent_sum_exactly(cost: CostHarness) -> None:
    session = new_id()
    documents = [new_id() for _ in range(100_000)]
    batches = [
        pb.RecordCostsRequest(events=[event(session, document_id=d, units="1") for d in documents[i:i + 2000]])
        for i in range(0, len(documents), 2000)
    ]
    semaphore = asyncio.Semaphore(4)

    async def send(batch: pb.RecordCostsRequest) -> Decimal:
        async with semaphore:
            reply = await cost.service.RecordCosts(batch)
        return dec(reply.total)

    totals = await asyncio.gather(*(send(b) for b in batches))
    assert sum(totals, Decimal(0)) == Decimal("150")
    costs = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session))
    assert costs.actual_total.amount == "150"
    assert costs.event_count == 100_000
    assert costs.by_operation[0].units == "100000"
    assert [d.amount.amount for d in costs.top_documents] == ["0.0015"] * 10
    assert await cost.pool.fetchval(
        "SELECT sum(amount) FROM cost.cost_events WHERE session_id = $1", session) == Decimal("150")
    # Rounded per event to cents, the old ledger said $0.00.
    assert sum((round(Decimal("0.0015"), 2) for _ in range(100_000)), Decimal(0)) == 0


async def test_large_amounts_keep_every_digit(cost: CostHarness) -> None:
    # Found by the property test: 29 significant digits must survive the wire.
    book = pb.PriceBook(name="big", prices=[pb.Price(service="x", operation="y", unit="u",
                                                     unit_price={"currency_code": "USD", "amount": "1000"})])
    version = (await cost.operator.PublishPriceBook(pb.PublishPriceBookRequest(price_book=book))).price_book.version
    session = new_id()
    reply = await cost.service.RecordCosts(pb.RecordCostsRequest(events=[
        event(session, document_id=new_id(), service="x", operation="y", units="999999999.99999704",
              price_book_version=version),
        event(session, document_id=new_id(), service="x", operation="y", units="0.00000001",
              price_book_version=version),
        event(session, document_id=new_id(), service="local", operation="compute_second", units="0.12345678",
              price_book_version=1),
    ]))
    expected = Decimal("999999999999.99704") + Decimal("0.00001") + Decimal("0.12345678") * CPU_RATE
    assert dec(reply.total) == expected
    costs = await cost.operator.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session))
    assert costs.actual_total.amount == "999999999999.9970524691356"
    assert dec(costs.actual_total) == expected


async def test_session_costs_validate_their_request(cost: CostHarness) -> None:
    for request_, field in [
        (pb.GetSessionCostsRequest(session_id="x"), "session_id"),
        (pb.GetSessionCostsRequest(session_id=new_id(), top_documents=-1), "top_documents"),
        (pb.GetSessionCostsRequest(session_id=new_id(), top_documents=1001), "top_documents"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cost.operator.GetSessionCosts(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in violations(caught.value)
