"""The cost CLI against the in-process service: prices, prices publish, costs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import TOKENS
from docimport.cost.v1 import cost_service_pb2 as pb
from typer.testing import CliRunner

from clients.cli.app import app
from clients.cli.commands.cost import usd
from clients.cli.context import Clients, set_clients
from services.common.config import ClientSettings

from .conftest import CostHarness
from .helpers import event, new_id
from .helpers import usd as usd_money
from .test_price_book import SMALL_BOOK


async def run(*args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def cli(cost: CostHarness) -> Iterator[None]:
    settings = ClientSettings(cost_addr=f"127.0.0.1:{cost.port}", token=TOKENS["operator"])
    cli_clients = Clients(settings)
    set_clients(cli_clients)
    try:
        yield
    finally:
        set_clients(None)
        cli_clients.close()


def test_display_rounding() -> None:
    assert usd("0") == "$0.00"
    assert usd("150.004") == "$150.00"
    assert usd("1234.5") == "$1,234.50"
    assert usd("0.0015") == "$0.0015"
    assert usd("0.0000171481479921") == "$0.00001715"
    assert usd("3E-16") == "<$0.00000001"


async def test_prices_shows_the_current_book(cost: CostHarness, cli: None) -> None:
    code, text = await run("prices")
    assert code == 0, text
    assert "Price book v1" in text and "aws_textract" in text and "$0.0015" in text
    assert "$0.00002" in text  # the configured CPU rate
    code, text = await run("prices", "--rules")
    assert code == 0 and "Plan rules" in text and "text_layer" in text
    code, text = await run("prices", "--json")
    assert code == 0
    book = json.loads(text)
    assert book["version"] == 1
    prices = {(p["service"], p["operation"]): p["unit_price"]["amount"] for p in book["prices"]}
    assert prices["aws_textract", "ocr_page"] == "0.0015"
    code, text = await run("prices", "--version", "7")
    assert code == 4 and "does not exist" in text


async def test_prices_publish(cost: CostHarness, cli: None, tmp_path: Path) -> None:
    path = tmp_path / "book.toml"
    path.write_text(SMALL_BOOK)
    code, text = await run("prices", "publish", str(path), "--request-id", "cli-1")
    assert code == 0, text
    assert "published price book version 2" in text and "$0.002" in text
    code, text = await run("prices", "publish", str(path), "--request-id", "cli-1", "--json")
    assert code == 0 and json.loads(text)["version"] == 2
    code, text = await run("prices")
    assert "Price book v2" in text and "small" in text
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[[prices]]\nservice = 'a'\noperation = 'b'\nunit = 'c'\nunit_price = '-1'\n")
    code, text = await run("prices", "publish", str(bad))
    assert code == 2 and "toml.prices[0].unit_price" in text and "negative" in text
    code, text = await run("prices", "publish", str(tmp_path / "missing.toml"))
    assert code == 2 and "cannot read" in text


async def test_costs_of_a_session(cost: CostHarness, cli: None) -> None:
    session, doc = new_id(), new_id()
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[
        event(session, document_id=doc, units="1000", category="pleadings"),
        event(session, document_id=doc, units="1200", kind=pb.COST_KIND_ESTIMATE),
        event(session, document_id=doc, stage=2, service="local", operation="compute_second", units="3",
              cache_hit=True),
    ]))
    await cost.service.SetBudget(pb.SetBudgetRequest(session_id=session, limit=usd_money("5")))
    code, text = await run("costs", session)
    assert code == 0, text
    for fragment in ("actual $1.50", "estimate $1.80", "83% of the estimate", "By service and operation",
                     "aws_textract/ocr_page", "By stage", "extract", "Estimate against actual", "-$0.30",
                     "Most expensive documents", "pleadings", "Budget", "$5.00", "cache hits 1"):
        assert fragment in text, (fragment, text)
    code, text = await run("costs", session, "--json")
    assert code == 0
    data = json.loads(text)
    assert Decimal(data["costs"]["actual_total"]["amount"]) == Decimal("1.5")
    assert data["budget"]["limit"]["amount"] == "5"
    code, text = await run("costs", new_id(), "--json")
    assert code == 0 and json.loads(text)["budget"] is None
    code, text = await run("costs", "not-a-session")
    assert code == 2 and "session_id" in text
