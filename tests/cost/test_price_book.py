"""Price books over gRPC: the default version 1, publishing, immutability, paging."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import grpc
import pytest
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2 as pb

from services.cost.config import DEFAULT_PRICE_BOOK
from services.cost.store import CostStore

from .conftest import CPU_RATE, CostHarness
from .helpers import dec, usd, violations

SMALL_BOOK = """
name = "small"
description = "two prices"
ocr_engine = "aws_textract"

[[prices]]
service = "aws_textract"
operation = "ocr_page"
unit = "page"
unit_price = "0.002"

[[prices]]
service = "local"
operation = "compute_second"
unit = "cpu_second"
unit_price = "0.00003"

[plan_rules]
ocr = [
  { stage = "extract", service = "aws_textract", operation = "ocr_page", basis = "ocr_page", units_per = "1", ocr = "aws_textract" },
  { stage = "extract", service = "local", operation = "compute_second", basis = "ocr_page", units_per = "4", ocr = "local" },
]
"""


async def test_default_book_is_version_1_with_the_configured_cpu_rate(cost: CostHarness) -> None:
    book = (await cost.operator.GetPriceBook(pb.GetPriceBookRequest())).price_book
    assert book.version == 1
    assert book.name == "default"
    prices = {(p.service, p.operation): p for p in book.prices}
    assert dec(prices["local", "compute_second"].unit_price) == CPU_RATE
    assert prices["aws_textract", "ocr_page"].unit_price.amount == "0.0015"
    assert prices["aws_textract", "ocr_page"].unit_price.currency_code == "USD"
    assert {r.plan for r in book.plan_rules} == {
        common_pb2.PROCESSING_PLAN_TEXT_LAYER, common_pb2.PROCESSING_PLAN_OCR,
        common_pb2.PROCESSING_PLAN_DOCX, common_pb2.PROCESSING_PLAN_EMAIL,
        common_pb2.PROCESSING_PLAN_IMAGE, common_pb2.PROCESSING_PLAN_TEXT,
    }
    assert book.published_at.seconds > 0


async def test_concurrent_first_starts_load_the_default_once(pool, db_url) -> None:
    stores = [CostStore(pool) for _ in range(8)]
    books = await asyncio.gather(
        *(s.ensure_default_price_book(DEFAULT_PRICE_BOOK, None) for s in stores)
    )
    assert {b.version for b in books} == {1}
    assert await pool.fetchval("SELECT count(*) FROM cost.price_books") == 1
    # A later start with another rate leaves the published version alone.
    again = await CostStore(pool).ensure_default_price_book(DEFAULT_PRICE_BOOK, Decimal("0.5"))
    assert again.version == 1
    assert again.price("local", "compute_second").unit_price == Decimal("0.00001389")


async def test_publish_toml_makes_a_new_version_and_leaves_the_old_one(cost: CostHarness) -> None:
    before = (await cost.operator.GetPriceBook(pb.GetPriceBookRequest(version=1))).price_book
    published = (await cost.operator.PublishPriceBook(
        pb.PublishPriceBookRequest(request_id="r-1", toml=SMALL_BOOK)
    )).price_book
    assert published.version == 2
    assert published.name == "small"
    assert [(r.service, r.units_per) for r in published.plan_rules] == [("aws_textract", "1")]
    current = (await cost.operator.GetPriceBook(pb.GetPriceBookRequest())).price_book
    assert current == published
    after = (await cost.operator.GetPriceBook(pb.GetPriceBookRequest(version=1))).price_book
    assert after == before


async def test_publish_is_idempotent_by_request_id(cost: CostHarness) -> None:
    request = pb.PublishPriceBookRequest(request_id="same", toml=SMALL_BOOK)
    first, second = await asyncio.gather(
        cost.operator.PublishPriceBook(request), cost.operator.PublishPriceBook(request)
    )
    assert first.price_book == second.price_book
    listed = await cost.operator.ListPriceBooks(pb.ListPriceBooksRequest())
    assert [b.version for b in listed.price_books] == [2, 1]


async def test_concurrent_publishers_get_consecutive_versions(cost: CostHarness) -> None:
    replies = await asyncio.gather(*(
        cost.operator.PublishPriceBook(pb.PublishPriceBookRequest(toml=SMALL_BOOK)) for _ in range(6)
    ))
    assert sorted(r.price_book.version for r in replies) == [2, 3, 4, 5, 6, 7]


async def test_publish_a_book_message(cost: CostHarness) -> None:
    book = pb.PriceBook(
        name="from proto",
        prices=[pb.Price(service="local", operation="compute_second", unit="cpu_second",
                         unit_price=usd("0.00000001"))],
        plan_rules=[pb.PlanRule(plan=common_pb2.PROCESSING_PLAN_TEXT, stage=common_pb2.STAGE_EXTRACT,
                                service="local", operation="compute_second", basis="mb", units_per="2.5")],
    )
    published = (await cost.operator.PublishPriceBook(pb.PublishPriceBookRequest(price_book=book))).price_book
    assert published.version == 2
    assert published.prices[0].unit_price.amount == "0.00000001"
    assert published.plan_rules[0].units_per == "2.5"


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (pb.PublishPriceBookRequest(), {"price_book", "toml"}),
        (pb.PublishPriceBookRequest(toml=SMALL_BOOK, price_book=pb.PriceBook(name="x")), {"price_book", "toml"}),
        (pb.PublishPriceBookRequest(price_book=pb.PriceBook(name="x", version=4, prices=[
            pb.Price(service="a", operation="b", unit="c", unit_price=usd("1.123456789"))])),
         {"price_book.version", "price_book.prices[0].unit_price"}),
        (pb.PublishPriceBookRequest(price_book=pb.PriceBook(name="x", prices=[
            pb.Price(service="a", operation="b", unit="c", unit_price=usd("1"))], plan_rules=[
            pb.PlanRule(stage=common_pb2.STAGE_EXTRACT, service="a", operation="b", basis="file", units_per="1"),
            pb.PlanRule(plan=common_pb2.PROCESSING_PLAN_OCR, stage=common_pb2.STAGE_EXTRACT, service="a",
                        operation="nope", basis="file", units_per="x")])),
         {"price_book.plan_rules[0].plan", "price_book.plan_rules[1].operation",
          "price_book.plan_rules[1].units_per"}),
        (pb.PublishPriceBookRequest(price_book=pb.PriceBook(name="x")), {"price_book.prices"}),
        (pb.PublishPriceBookRequest(toml="name = [1, 2"), {"toml"}),
    ],
)
async def test_publish_refuses_bad_books_field_by_field(cost: CostHarness, request_, fields) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.operator.PublishPriceBook(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields <= set(violations(caught.value)), violations(caught.value)
    listed = await cost.operator.ListPriceBooks(pb.ListPriceBooksRequest())
    assert [b.version for b in listed.price_books] == [1]


async def test_unknown_version_is_not_found(cost: CostHarness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.operator.GetPriceBook(pb.GetPriceBookRequest(version=42))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "42" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.operator.GetPriceBook(pb.GetPriceBookRequest(version=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_price_books_paginates_newest_first(cost: CostHarness) -> None:
    for _ in range(4):
        await cost.operator.PublishPriceBook(pb.PublishPriceBookRequest(toml=SMALL_BOOK))
    seen, token = [], ""
    while True:
        page = await cost.service.ListPriceBooks(pb.ListPriceBooksRequest(page_size=2, page_token=token))
        seen.extend(b.version for b in page.price_books)
        token = page.next_page_token
        if not token:
            break
    assert seen == [5, 4, 3, 2, 1]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.ListPriceBooks(pb.ListPriceBooksRequest(page_token="garbage!"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("rate", ["-1", "0.000000001", "NaN"])
async def test_a_bad_configured_cpu_rate_fails_at_start(pool, rate: str) -> None:
    with pytest.raises(ValueError, match="CPU_SECOND_RATE"):
        await CostStore(pool).ensure_default_price_book(DEFAULT_PRICE_BOOK, Decimal(rate))
    assert await pool.fetchval("SELECT count(*) FROM cost.price_books") == 0
