"""The cost service's Prometheus metrics (on top of `services.common.metrics`).

Owns these families:

- `docimport_cost_amount_total{service,operation,kind}` and
  `docimport_cost_events_total{...}`, `docimport_cost_saved_total{...}`:
  what the ledger charged (and what cache hits saved), counted when a
  ledger row is inserted, never for a replay, so across the process's life
  they add up to the ledger. The amounts are Decimal until here; a sample
  is a float (exactness is the ledger's job, trends are this one's);
- `docimport_budget_limit|spent|reserved|remaining{session_id}`: budgets read
  on scrape, limited to budgets with open reservations or changed within
  `DOCIMPORT_METRICS_BUDGET_WINDOW` seconds, so finished sessions drop out;
- `docimport_watchers{stream="WatchCosts"}`: open cost streams.

Children of the ledger counters are cached per (service, operation, kind),
a small closed set from the price book. No SQL here (the store answers
`recent_budgets`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric

from services.common.metrics import ServiceMetrics, family

_BUDGET_FIELDS = (
    ("limit", "docimport_budget_limit", "A session's budget limit."),
    ("spent", "docimport_budget_spent", "What a session has spent against its budget."),
    ("reserved", "docimport_budget_reserved", "Open reservations against a session's budget."),
    ("remaining", "docimport_budget_remaining",
     "What is left of a session's budget (limit - reserved - spent, never below zero)."),
)


def _budget_families() -> list[Any]:
    return [family("gauge", name, doc, ["session_id"]) for _, name, doc in _BUDGET_FIELDS]


class CostMetrics(ServiceMetrics):
    """The cost service's registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        labels = ["service", "operation", "kind"]
        self._amount = Counter("docimport_cost_amount", "Amounts charged to the ledger (currency units).",
                               labels, registry=self.registry)
        self._saved = Counter("docimport_cost_saved", "Amounts cache hits saved (currency units).",
                              labels, registry=self.registry)
        self._events = Counter("docimport_cost_events", "Ledger events recorded.", labels,
                               registry=self.registry)
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self.watch_costs = self.watchers.labels("WatchCosts")

    def recorded(self, events: Iterable[Any]) -> None:
        """Counts newly inserted ledger events (`store.CostEvent`s)."""
        for event in events:
            key = (event.service, event.operation, event.kind)
            children = self._children.get(key)
            if children is None:
                children = (self._amount.labels(*key), self._saved.labels(*key),
                            self._events.labels(*key))
                self._children[key] = children
            amount, saved, count = children
            count.inc()
            if event.amount:
                amount.inc(float(event.amount))
            if event.saved:
                saved.inc(float(event.saved))

    def watch_budgets(self, store: Any, *, window: float) -> None:
        """Registers the budget gauges, read from the store at each scrape."""

        async def read() -> list[Metric]:
            families = _budget_families()
            for budget in await store.recent_budgets(window):
                sid = str(budget.session_id)
                for metric, (attr, _, _) in zip(families, _BUDGET_FIELDS, strict=True):
                    metric.add_metric([sid], float(getattr(budget, attr)))
            return families

        self.add_database_collector("budgets", read, _budget_families())
