"""Settings of the cost service (environment variables `DOCIMPORT_*`)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from services.common.config import ServiceSettings

DEFAULT_PRICE_BOOK = Path(__file__).with_name("pricebook.toml")


class CostSettings(ServiceSettings):
    """`DOCIMPORT_PORT` defaults to 50063 for this service."""

    port: int = 50063
    # The book loaded as version 1 when the ledger has none.
    price_book_file: Path = DEFAULT_PRICE_BOOK
    # Overrides the book's price of a local CPU-second, when set.
    cpu_second_rate: Decimal | None = None
    # Lifetime of an unsettled budget reservation, seconds.
    reservation_ttl: float = 3600.0
