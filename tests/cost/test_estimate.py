"""EstimateCost: lines and per-file plans, priced exactly, naming the book version."""

from __future__ import annotations

from decimal import Decimal

import grpc
import pytest
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2 as pb

from .conftest import CPU_RATE, CostHarness
from .helpers import dec, violations
from .test_price_book import SMALL_BOOK


async def test_lines_are_priced_exactly(cost: CostHarness) -> None:
    reply = await cost.service.EstimateCost(pb.EstimateCostRequest(lines=[
        pb.EstimateLine(key="ocr", service="aws_textract", operation="ocr_page", units="100000"),
        pb.EstimateLine(key="cpu", service="local", operation="compute_second", units="1.23456789"),
        pb.EstimateLine(key="llm", service="openai", operation="input_tokens_1k", units="3"),
    ]))
    assert reply.price_book_version == 1
    amounts = {line.key: dec(line.amount) for line in reply.lines}
    assert amounts == {
        "ocr": Decimal("150"),
        "cpu": Decimal("1.23456789") * CPU_RATE,
        "llm": Decimal("0.00045"),
    }
    assert dec(reply.total) == sum(amounts.values())
    assert reply.lines[1].unit_price.amount == "0.00002"
    assert reply.lines[1].units == "1.23456789"
    by_service = {t.key: dec(t.amount) for t in reply.by_service}
    assert by_service == {"aws_textract": Decimal(150), "local": amounts["cpu"], "openai": Decimal("0.00045")}
    assert [t.key for t in reply.by_service] == ["aws_textract", "openai", "local"]  # largest first


async def test_file_plans_are_priced_by_the_rules(cost: CostHarness) -> None:
    files = [
        pb.FilePlan(key="complaint.pdf", plan=common_pb2.PROCESSING_PLAN_TEXT_LAYER, page_count=10,
                    size_bytes=50_000),
        pb.FilePlan(key="scan.pdf", plan=common_pb2.PROCESSING_PLAN_OCR, page_count=3, ocr_page_count=3,
                    size_bytes=900_000),
        pb.FilePlan(key="photo.png", plan=common_pb2.PROCESSING_PLAN_IMAGE, size_bytes=6_000),
        pb.FilePlan(key="a.docx", plan=common_pb2.PROCESSING_PLAN_DOCX, size_bytes=2_000_000),
        pb.FilePlan(key="m.eml", plan=common_pb2.PROCESSING_PLAN_EMAIL, size_bytes=500_000),
        pb.FilePlan(key="n.txt", plan=common_pb2.PROCESSING_PLAN_TEXT, size_bytes=1_000),
        pb.FilePlan(key="movie.mp4", plan=common_pb2.PROCESSING_PLAN_UNSUPPORTED, size_bytes=10**9),
    ]
    reply = await cost.service.EstimateCost(pb.EstimateCostRequest(files=files))
    by_key = {f.key: f for f in reply.files}
    assert [f.key for f in reply.files] == [f.key for f in files]
    # text_layer: extract 10 x 0.05 + 0.1 = 0.6 s, chunk 10 x 0.005, entities 10 x 0.03
    complaint = by_key["complaint.pdf"]
    assert [(line.stage, line.units) for line in complaint.lines] == [
        (common_pb2.STAGE_EXTRACT, "0.6"), (common_pb2.STAGE_CHUNK, "0.05"), (common_pb2.STAGE_ENTITIES, "0.3"),
    ]
    assert dec(complaint.amount) == Decimal("0.95") * CPU_RATE
    # local OCR: 3 pages x 4 s + 0.1 s per file
    scan_extract = by_key["scan.pdf"].lines[0]
    assert (scan_extract.service, scan_extract.units) == ("local", "12.1")
    assert by_key["movie.mp4"].lines == [] and dec(by_key["movie.mp4"].amount) == 0
    for f in reply.files:
        assert dec(f.amount) == sum((dec(line.amount) for line in f.lines), Decimal(0))
        for line in f.lines:
            assert dec(line.amount) == Decimal(line.units) * dec(line.unit_price)
            assert line.key == f.key
    assert dec(reply.total) == sum((dec(f.amount) for f in reply.files), Decimal(0))
    ops = {t.key: t for t in reply.by_operation}
    assert set(ops) == {"local/compute_second"}
    assert Decimal(ops["local/compute_second"].units) == sum(
        (Decimal(line.units) for f in reply.files for line in f.lines), Decimal(0))


async def test_a_pinned_version_prices_with_that_book(cost: CostHarness) -> None:
    await cost.operator.PublishPriceBook(pb.PublishPriceBookRequest(toml=SMALL_BOOK))
    scan = pb.FilePlan(key="s", plan=common_pb2.PROCESSING_PLAN_OCR, page_count=5, ocr_page_count=5)
    current = await cost.service.EstimateCost(pb.EstimateCostRequest(files=[scan]))
    assert current.price_book_version == 2
    assert [(line.service, line.units, line.amount.amount) for line in current.files[0].lines] == [
        ("aws_textract", "5", "0.01")
    ]
    old = await cost.service.EstimateCost(pb.EstimateCostRequest(price_book_version=1, files=[scan]))
    assert old.price_book_version == 1
    assert {line.service for line in old.files[0].lines} == {"local"}


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (pb.EstimateCostRequest(lines=[pb.EstimateLine(service="nobody", operation="x", units="1")]),
         {"lines[0].operation"}),
        (pb.EstimateCostRequest(lines=[pb.EstimateLine(units="abc")]),
         {"lines[0].service", "lines[0].operation", "lines[0].units"}),
        (pb.EstimateCostRequest(lines=[pb.EstimateLine(service="local", operation="compute_second",
                                                       units="-1")]), {"lines[0].units"}),
        (pb.EstimateCostRequest(lines=[pb.EstimateLine(service="local", operation="compute_second",
                                                       units="NaN")]), {"lines[0].units"}),
        (pb.EstimateCostRequest(files=[pb.FilePlan(key="a"), pb.FilePlan(
            plan=common_pb2.PROCESSING_PLAN_OCR, page_count=1, ocr_page_count=2),
            pb.FilePlan(plan=common_pb2.PROCESSING_PLAN_TEXT, size_bytes=-5)]),
         {"files[0].plan", "files[1].ocr_page_count", "files[2].size_bytes"}),
        # An enum number the enum does not define: refused by the checks of every request.
        (pb.EstimateCostRequest(files=[pb.FilePlan(key="a"), pb.FilePlan(plan=99)]), {"files[1].plan"}),
    ],
)
async def test_bad_estimates_name_each_field(cost: CostHarness, request_, fields) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.EstimateCost(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == set(violations(caught.value)), violations(caught.value)


async def test_unknown_book_version_is_not_found(cost: CostHarness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.service.EstimateCost(pb.EstimateCostRequest(price_book_version=9))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_large_manifest_estimate(cost: CostHarness) -> None:
    files = [pb.FilePlan(key=f"f{i}", plan=common_pb2.PROCESSING_PLAN_OCR, page_count=4, ocr_page_count=1,
                         size_bytes=123_456 + i) for i in range(20_000)]
    reply = await cost.service.EstimateCost(pb.EstimateCostRequest(files=files))
    assert len(reply.files) == 20_000
    # each: extract 3 x 0.05 + 0.1 + 1 x 4 = 4.25 s, chunk 0.02 s, entities 0.12 s
    assert dec(reply.total) == Decimal(20_000) * Decimal("4.39") * CPU_RATE
