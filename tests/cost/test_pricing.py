"""The pricing domain without a database: the default book, TOML, estimates, exactness."""

from __future__ import annotations

import datetime as dt
import decimal
from decimal import Decimal
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.cost import pricing
from services.cost.config import DEFAULT_PRICE_BOOK
from services.cost.pricing import FileFacts, PriceBook


def published(draft: pricing.PriceBookDraft, version: int = 1) -> PriceBook:
    return PriceBook(version, draft.name, draft.description, dt.datetime.now(dt.UTC),
                     draft.prices, draft.plan_rules)


def default_book(engine: str = "local") -> PriceBook:
    text = DEFAULT_PRICE_BOOK.read_text().replace('ocr_engine = "local"', f'ocr_engine = "{engine}"')
    return published(pricing.parse_price_book_toml(text))


def test_default_book_prices_what_the_issue_names() -> None:
    book = default_book()
    expected = {
        ("local", "compute_second"): "cpu_second",
        ("aws_textract", "ocr_page"): "page",
        ("openai", "input_tokens_1k"): "1k_tokens",
        ("openai", "output_tokens_1k"): "1k_tokens",
        ("s3", "put_request"): "request",
        ("s3", "get_request"): "request",
        ("s3", "storage_gb_month"): "gb_month",
    }
    for (service, operation), unit in expected.items():
        price = book.price(service, operation)
        assert price is not None, (service, operation)
        assert price.unit == unit
        assert isinstance(price.unit_price, Decimal)
    assert book.price("aws_textract", "ocr_page").unit_price == Decimal("0.0015")


@pytest.mark.parametrize("engine", ["local", "aws_textract"])
def test_every_processable_plan_has_rules_for_every_stage(engine: str) -> None:
    book = default_book(engine)
    for plan in ("text_layer", "ocr", "docx", "email", "image", "text"):
        stages = {rule.stage for rule in book.rules_for(plan)}
        assert stages == {"extract", "chunk", "entities"}, plan
    assert book.rules_for("unsupported") == ()


def test_ocr_engine_selects_the_ocr_rules() -> None:
    scan = FileFacts("scan.pdf", "ocr", page_count=10, ocr_page_count=4, size_bytes=1_000_000)
    textract = pricing.estimate_file(default_book("aws_textract"), scan)
    ocr = [line for line in textract.lines if line.service == "aws_textract"]
    assert [(line.stage, line.units, line.amount) for line in ocr] == [
        ("extract", Decimal(4), Decimal("0.006"))
    ]
    local = pricing.estimate_file(default_book("local"), scan)
    assert not [line for line in local.lines if line.service == "aws_textract"]
    extract = [line for line in local.lines if line.stage == "extract"]
    # 6 text pages x 0.05 s + 0.1 s per file + 4 OCR pages x 4 s
    assert [line.units for line in extract] == [Decimal("16.4")]


def test_file_estimate_is_the_exact_sum_of_its_lines() -> None:
    book = default_book()
    facts = FileFacts("a.docx", "docx", page_count=0, ocr_page_count=0, size_bytes=1_234_567)
    estimate = pricing.estimate_file(book, facts)
    rate = book.price("local", "compute_second").unit_price
    for line in estimate.lines:
        assert line.amount == line.units * rate
        assert pricing.places(line.units) <= 8
    assert estimate.amount == sum((line.amount for line in estimate.lines), Decimal(0))
    # extract: 1.234567 MB x 0.5 s + 0.05 s
    extract = next(line for line in estimate.lines if line.stage == "extract")
    assert extract.units == Decimal("0.6672835")


def test_mb_units_round_up_to_eight_places_and_amounts_stay_exact() -> None:
    book = published(pricing.build_draft(
        name="t", description="",
        prices=[{"service": "local", "operation": "compute_second", "unit": "s", "unit_price": "0.00000003"}],
        plan_rules=[{"plan": "text", "stage": "extract", "service": "local", "operation": "compute_second",
                     "basis": "mb", "units_per": "0.00000001"}],
    ))
    estimate = pricing.estimate_file(book, FileFacts("t", "text", 0, 0, size_bytes=1))
    # 0.000001 MB x 0.00000001 = 1e-14 units -> rounded up to 1e-8 units
    assert estimate.lines[0].units == Decimal("0.00000001")
    assert estimate.amount == Decimal("3E-16")


def test_exact_context_refuses_to_round() -> None:
    assert pricing.times(Decimal("1.23456789"), Decimal("0.00001389")) == Decimal("0.0000171481479921")
    with pytest.raises(decimal.Inexact):
        pricing.EXACT.divide(Decimal(1), Decimal(3))


def test_event_id_is_a_function_of_the_idempotency_key() -> None:
    a = pricing.event_id("s", "d", "extract", 1, "aws_textract", "ocr_page", "actual")
    assert a == pricing.event_id("s", "d", "extract", 1, "aws_textract", "ocr_page", "actual")
    assert a != pricing.event_id("s", "d", "extract", 2, "aws_textract", "ocr_page", "actual")
    assert a != pricing.event_id("s", "d", "extract", 1, "aws_textract", "ocr_page", "estimate")
    assert a != pricing.event_id("s", None, "extract", 1, "aws_textract", "ocr_page", "actual")


def test_toml_numbers_are_read_as_decimals_never_floats() -> None:
    text = """
name = "n"
[[prices]]
service = "x"
operation = "y"
unit = "u"
unit_price = 0.1
[plan_rules]
text = [{ stage = "extract", service = "x", operation = "y", basis = "file", units_per = 0.3 }]
"""
    draft = pricing.parse_price_book_toml(text)
    assert draft.prices[0].unit_price == Decimal("0.1")
    assert draft.plan_rules[0].units_per == Decimal("0.3")


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("name = 'n'\nprices = 3", "toml.prices", "array"),
        ("name = ''\n[[prices]]\nservice='x'\noperation='y'\nunit='u'\nunit_price='1'", "toml.name", "required"),
        ("name='n'\n[[prices]]\nservice='x'\noperation='y'\nunit='u'\nunit_price='0.000000001'",
         "toml.prices[0].unit_price", "8 decimal places"),
        ("name='n'\n[[prices]]\nservice='x'\noperation='y'\nunit='u'\nunit_price='-1'",
         "toml.prices[0].unit_price", "negative"),
        ("name='n'\n[[prices]]\nservice='X Y'\noperation='y'\nunit='u'\nunit_price='1'",
         "toml.prices[0].service", "lower-case"),
        ("name='n'\n[[prices]]\nservice='x'\noperation='y'\nunit='u'\nunit_price='1'\n"
         "[plan_rules]\nocr = [{ stage='extract', service='x', operation='z', basis='page', units_per='1' }]",
         "toml.plan_rules.ocr[0].operation", "no price"),
        ("name='n'\n[[prices]]\nservice='x'\noperation='y'\nunit='u'\nunit_price='1'\n"
         "[plan_rules]\nocr = [{ stage='extract', service='x', operation='y', basis='kchars', units_per='1' }]",
         "toml.plan_rules.ocr[0].basis", "not one of"),
        ("name='n'\n[[prices]]\nservice='x'\noperation='y'\nunit='u'\nunit_price='1'\n"
         "[plan_rules]\nscan = [{ stage='extract', service='x', operation='y', basis='page', units_per='1' }]",
         "toml.plan_rules.scan", "not one of"),
        ("name='n'\nocr_engine='tesseract'\n[[prices]]\nservice='x'\noperation='y'\nunit='u'\nunit_price='1'",
         "toml.ocr_engine", "not one of"),
        ("name='n'\n[[prices]]\nservice='x'\noperation='y'\nunit='u'\nunit_price='1'\n"
         "[[prices]]\nservice='x'\noperation='y'\nunit='u'\nunit_price='2'", "toml.prices[1]", "twice"),
        ("this is = not toml =", "toml", "not valid TOML"),
    ],
)
def test_bad_toml_names_the_field(text: str, field: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        pricing.parse_price_book_toml(text)
    found = {v.field: v.description for v in caught.value.violations}
    assert field in found, found
    assert fragment in found[field]


def test_the_shipped_file_is_the_configured_default() -> None:
    assert DEFAULT_PRICE_BOOK == Path(pricing.__file__).with_name("pricebook.toml")
