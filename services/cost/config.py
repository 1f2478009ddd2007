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
    # Overrides the book's price of a local CPU-second when it is loaded as
    # version 1 (DOCIMPORT_CPU_SECOND_RATE, a decimal string).
    cpu_second_rate: Decimal | None = None
    # Lifetime of an unsettled budget reservation, seconds (a request's ttl wins).
    reservation_ttl: float = 3600.0
    # How often overdue reservations are marked expired, seconds (0 = never;
    # reads discount them either way).
    expiry_sweep_interval: float = 30.0
    # How often the ledger's per-session total deltas are folded, seconds (0 =
    # never; reads add the deltas not folded yet, so only their speed depends on it).
    totals_fold_interval: float = 5.0
    # WatchCosts: a stream re-reads its totals at least this often, seconds,
    # even without a change notification ...
    watch_poll_interval: float = 5.0
    # ... and at most once per this many seconds (bursts are coalesced).
    watch_min_interval: float = 0.5
    # /metrics exports the budgets with open reservations or changed within
    # this many seconds (DOCIMPORT_METRICS_BUDGET_WINDOW).
    metrics_budget_window: float = 86400.0
