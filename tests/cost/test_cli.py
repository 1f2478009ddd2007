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
