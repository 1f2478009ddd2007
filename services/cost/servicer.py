"""The CostService RPCs: validation and proto <-> domain conversion.

Owns the RPC surface of `docimport.cost.v1.CostService` and its scope policy
(`POLICY`). It checks every request field (INVALID_ARGUMENT with one field
violation per problem, e.g. `events[3].units`), turns protos into domain
values, prices events with `pricing`, and calls `CostStore`. No SQL here,
no environment reads; errors are domain errors mapped by the shared
interceptor.

Decisions:
- Money on the wire is a decimal string. Inputs that are prices or units
  take at most 8 fractional digits; amounts that may be ledger sums (budget
  limits, reservations, settlements) take up to 16, so any amount this
  service answered with can be sent back exactly.
- `CostTotal.units` is filled only for groups of one operation (by
  operation): summing pages with seconds means nothing.
- GetSessionCosts' `event_count`, `cache_hits` and `cache_savings` count
  actual events; estimates are reported separately.
- A worker token records only actual costs of runs the session service
  dispatched, each event carrying its run's grant (services/common/grants.py);
  anything else is PERMISSION_DENIED, logged.
- ListCostEvents needs a session or a document: both are indexed, so a
  page never sorts the whole ledger.
- WatchCosts answers NOT_FOUND for a session this service knows nothing
  of (no budget, no ledger event: the session service sets the budget and
  records the estimate when it creates a session), instead of streaming
  zeros forever. It wakes on the store's change feed (LISTEN/NOTIFY), re-reads at
  least every `watch_poll_interval`, coalesces bursts to one message per
  `watch_min_interval`, sends only when something changed, and ends when
  the client cancels (the handler task is cancelled; the subscription is
  released on the way out).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any

import grpc
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2 as pb
from docimport.cost.v1 import cost_service_pb2_grpc

from services.common import convert
from services.common.auth import Scope, current_scope, policy_for
from services.common.convert import LEDGER_PLACES, money
from services.common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Validator,
)
from services.common.grants import GrantChecker
from services.common.metrics import watching
from services.common.validate import Rules, field_name
from services.cost import pricing
from services.cost.config import CostSettings
from services.cost.metrics import CostMetrics
from services.cost.pricing import (
    EXACT,
    FileFacts,
    PriceBook,
    PricedLine,
    Total,
    UnknownPrice,
    exact_sum,
    times,
)
from services.cost.budgets import Budget, Reservation
from services.cost.store import (
    CostEvent,
    CostGroup,
    CostSnapshot,
    CostStore,
    EventFilter,
)

logger = logging.getLogger(__name__)

SERVICE_FULL_NAME = pb.DESCRIPTOR.services_by_name["CostService"].full_name

_OP, _SVC, _WK = Scope.OPERATOR, Scope.SERVICE, Scope.WORKER
POLICY = policy_for(
    SERVICE_FULL_NAME,
    {
        "GetPriceBook": {_OP, _SVC},
        "ListPriceBooks": {_OP, _SVC},
        # PublishPriceBook: operators only (not listed).
        "EstimateCost": {_OP, _SVC},
        "RecordCosts": {_WK, _SVC},
        "GetSessionCosts": {_OP, _SVC},
        "ListCostEvents": {_OP, _SVC},
        "WatchCosts": {_OP, _SVC},
        "SetBudget": {_OP, _SVC},
        "GetBudget": {_OP, _SVC},
        "ReserveBudget": {_SVC},
        "SettleReservation": {_SVC},
        "ReleaseReservation": {_SVC},
    },
)

# The generic input checks (services.common.validate) with a price book's TOML
# allowed to be long: 10,000 prices of a few lines each.
INPUT_RULES = Rules(max_chars={field_name(pb.PublishPriceBookRequest, "toml"): 4 * 1024 * 1024})

MAX_EVENTS = 10_000
MAX_ESTIMATE_ITEMS = 200_000
MAX_RESERVATIONS = 10_000
MAX_KEY = 200
MAX_CATEGORY = 200
MAX_TOP_DOCUMENTS = 1000
MAX_TTL_SECONDS = 7 * 24 * 3600
MAX_MONEY = convert.MAX_AMOUNT

_KINDS = {pb.COST_KIND_ESTIMATE: "estimate", pb.COST_KIND_ACTUAL: "actual"}
_KIND_VALUES = {name: value for value, name in _KINDS.items()}
_STATES = {
    "open": pb.RESERVATION_STATE_OPEN,
    "settled": pb.RESERVATION_STATE_SETTLED,
    "released": pb.RESERVATION_STATE_RELEASED,
    "expired": pb.RESERVATION_STATE_EXPIRED,
}
_STAGE_VALUES = frozenset(common_pb2.Stage.values())
_STAGE_NAMES = {value: convert.stage_name(value) for value in _STAGE_VALUES}
_STAGE_NUMBERS = {name: value for value, name in _STAGE_NAMES.items()}
_PLAN_VALUES = frozenset(common_pb2.ProcessingPlan.values()) - {common_pb2.PROCESSING_PLAN_UNSPECIFIED}


class _Check(Validator):
    """A Validator that keeps the first 50 problems of a big batch."""

    LIMIT = 50

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def add(self, field_name: str, description: str) -> None:
        self.count += 1
        if self.count <= self.LIMIT:
            super().add(field_name, description)

    def merge(self, error: InvalidArgument) -> None:
        for violation in error.violations:
            self.add(violation.field, violation.description)

    @property
    def omitted(self) -> int:
        return max(0, self.count - self.LIMIT)


def _uuid(text: str, field: str, check: _Check, *, required: bool = True) -> uuid.UUID | None:
    if not text:
        if required:
            check.add(field, "is required")
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        check.add(field, f"{text[:80]!r} is not a UUID")
        return None


def _decimal(text: str, field: str, check: _Check, *, places: int = pricing.PLACES,
             maximum: Decimal = MAX_MONEY) -> Decimal | None:
    try:
        value = convert.parse_decimal(text, field, places=places)
    except InvalidArgument as error:
        check.merge(error)
        return None
    if value >= maximum:
        check.add(field, f"must be less than {maximum:,}")
        return None
    return value


def _money_in(message: common_pb2.Money, field: str, check: _Check) -> Decimal | None:
    try:
        value = convert.parse_money(message, field, places=LEDGER_PLACES)
    except InvalidArgument as error:
        check.merge(error)
        return None
    if value >= MAX_MONEY:
        check.add(field, f"must be less than {MAX_MONEY:,}")
        return None
    return value


def _text(value: Decimal | None) -> str:
    """A decimal as a plain string without trailing zeros ('' for None)."""
    if value is None:
        return ""
    return format(value.normalize(EXACT), "f") if value else "0"


# ------------------------------------------------------------------ protos out


def _book_pb(book: PriceBook) -> pb.PriceBook:
    return pb.PriceBook(
        version=book.version,
        name=book.name,
        description=book.description,
        published_at=convert.timestamp(book.published_at),
        prices=[
            pb.Price(service=p.service, operation=p.operation, unit=p.unit,
                     unit_price=money(p.unit_price), description=p.description)
            for p in book.prices
        ],
        plan_rules=[
            pb.PlanRule(plan=convert.plan_value(r.plan), stage=convert.stage_value(r.stage),
                        service=r.service, operation=r.operation, basis=r.basis,
                        units_per=_text(r.units_per))
            for r in book.plan_rules
        ],
    )


def _line_pb(line: PricedLine) -> pb.PricedLine:
    return pb.PricedLine(
        key=line.key, service=line.service, operation=line.operation, units=_text(line.units),
        unit_price=money(line.unit_price), amount=money(line.amount),
        stage=convert.stage_value(line.stage),
    )


def _estimate_total_pb(total: Total, *, by_operation: bool) -> pb.CostTotal:
    return pb.CostTotal(
        key=f"{total.service}/{total.operation}" if by_operation else total.service,
        service=total.service,
        operation=total.operation,
        units=_text(total.units) if by_operation else "",
        amount=money(total.amount),
        event_count=total.count,
    )


def _group_pb(group: CostGroup) -> pb.CostTotal:
    return pb.CostTotal(
        key=group.key, service=group.service, operation=group.operation,
        stage=convert.stage_value(group.stage), units=_text(group.units),
        amount=money(group.amount), event_count=group.event_count,
    )


class _EventEncoder:
    """CostEvent protos of many events; a batch repeats its ids, prices and times, so they are cached."""

    def __init__(self) -> None:
        self._money: dict[Decimal, common_pb2.Money] = {}
        self._stamps: dict[dt.datetime | None, Any] = {}
        self._ids: dict[uuid.UUID | None, str] = {None: ""}

    def money(self, value: Decimal) -> common_pb2.Money:
        found = self._money.get(value)
        if found is None:
            found = self._money[value] = money(value)
        return found

    def stamp(self, value: dt.datetime | None) -> Any:
        if value not in self._stamps:
            self._stamps[value] = convert.timestamp(value)
        return self._stamps[value]

    def text(self, value: uuid.UUID | None) -> str:
        found = self._ids.get(value)
        if found is None:
            found = self._ids[value] = str(value)
        return found

    def __call__(self, event: CostEvent) -> pb.CostEvent:
        return pb.CostEvent(
            event_id=str(event.event_id),
            session_id=self.text(event.session_id),
            document_id=self.text(event.document_id),
            stage=_STAGE_NUMBERS[event.stage],
            attempt=event.attempt,
            service=event.service,
            operation=event.operation,
            units=_text(event.units),
            kind=_KIND_VALUES[event.kind],
            category=event.category,
            cache_hit=event.cache_hit,
            unit_price=self.money(event.unit_price),
            amount=self.money(event.amount),
            saved=self.money(event.saved),
            price_book_version=event.price_book_version,
            occurred_at=self.stamp(event.occurred_at),
            recorded_at=self.stamp(event.recorded_at),
        )


def _budget_pb(budget: Budget) -> pb.Budget:
    return pb.Budget(
        session_id=str(budget.session_id),
        limit=money(budget.limit),
        reserved=money(budget.reserved),
        spent=money(budget.spent),
        remaining=money(budget.remaining),
        overrun=money(budget.overrun),
        updated_at=convert.timestamp(budget.updated_at),
    )


def _reservation_pb(r: Reservation) -> pb.Reservation:
    message = pb.Reservation(
        reservation_id=str(r.reservation_id),
        session_id=str(r.session_id),
        key=r.key,
        amount=money(r.amount),
        state=_STATES[r.state],
        expires_at=convert.timestamp(r.expires_at),
    )
    if r.actual is not None:
        message.actual.CopyFrom(money(r.actual))
    return message


def _watch_pb(snapshot: CostSnapshot) -> pb.WatchCostsResponse:
    message = pb.WatchCostsResponse(
        session_id=str(snapshot.session_id),
        actual_total=money(snapshot.actual_total),
        estimate_total=money(snapshot.estimate_total),
        event_count=snapshot.event_count,
        observed_at=convert.timestamp(_now()),
    )
    if snapshot.budget is not None:
        message.budget.CopyFrom(_budget_pb(snapshot.budget))
    return message


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _filter_digest(where: EventFilter) -> str:
    raw = "|".join(str(v or "") for v in (where.session_id, where.document_id, where.stage,
                                          where.kind, where.service))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


# -------------------------------------------------------------------- servicer


class CostServicer(cost_service_pb2_grpc.CostServiceServicer):
    """Implements docimport.cost.v1.CostService on a CostStore."""

    def __init__(self, store: CostStore, settings: CostSettings,
                 metrics: CostMetrics | None = None) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics if metrics is not None else CostMetrics()
        self._grants = GrantChecker(settings.service_tokens)

    # ------------------------------------------------------------ price books

    async def _book(self, version: int, field: str) -> PriceBook:
        if version < 0:
            raise InvalidArgument.field(field, "must not be negative")
        return await self._store.price_book(version or None)

    async def GetPriceBook(self, request: pb.GetPriceBookRequest, context: grpc.aio.ServicerContext
                           ) -> pb.GetPriceBookResponse:
        book = await self._book(request.version, "version")
        return pb.GetPriceBookResponse(price_book=_book_pb(book))

    async def ListPriceBooks(self, request: pb.ListPriceBooksRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ListPriceBooksResponse:
        size = convert.page_size(request.page_size)
        cursor = convert.decode_page_token(request.page_token)
        before = None
        if cursor is not None:
            before = convert.cursor_int(cursor, "v", bits=32)  # price_books.version is an integer
        books = await self._store.list_price_books(before=before, limit=size + 1)
        token = ""
        if len(books) > size:
            books = books[:size]
            token = convert.encode_page_token({"v": books[-1].version})
        return pb.ListPriceBooksResponse(price_books=[_book_pb(b) for b in books], next_page_token=token)

    async def PublishPriceBook(self, request: pb.PublishPriceBookRequest,
                               context: grpc.aio.ServicerContext) -> pb.PublishPriceBookResponse:
        if len(request.request_id) > MAX_KEY:
            raise InvalidArgument.field("request_id", f"is longer than {MAX_KEY} characters")
        has_book, has_toml = request.HasField("price_book"), bool(request.toml.strip())
        if has_book == has_toml:
            raise InvalidArgument(violations=[
                FieldViolation("price_book", "give exactly one of price_book and toml"),
                FieldViolation("toml", "give exactly one of price_book and toml"),
            ])
        if has_toml:
            draft = pricing.parse_price_book_toml(request.toml)
        else:
            draft = self._draft_from_proto(request.price_book)
        book = await self._store.publish_price_book(draft, request.request_id or None)
        return pb.PublishPriceBookResponse(price_book=_book_pb(book))

    @staticmethod
    def _draft_from_proto(book: pb.PriceBook) -> pricing.PriceBookDraft:
        check = _Check()
        if book.version:
            check.add("price_book.version", "is assigned by the service; leave it 0")
        prices = []
        for i, p in enumerate(book.prices):
            if p.unit_price.currency_code not in ("", convert.CURRENCY):
                check.add(f"price_book.prices[{i}].unit_price.currency_code",
                          f"only {convert.CURRENCY} is supported")
            prices.append({"service": p.service, "operation": p.operation, "unit": p.unit,
                           "unit_price": p.unit_price.amount, "description": p.description})
        rules, paths = [], []
        for i, r in enumerate(book.plan_rules):
            where = f"price_book.plan_rules[{i}]"
            if r.plan not in _PLAN_VALUES:
                check.add(f"{where}.plan", "a processing plan is required")
                continue
            if r.stage not in _STAGE_VALUES or r.stage == common_pb2.STAGE_UNSPECIFIED:
                check.add(f"{where}.stage", "a stage is required")
                continue
            rules.append({"plan": convert.plan_name(r.plan), "stage": convert.stage_name(r.stage),
                          "service": r.service, "operation": r.operation, "basis": r.basis,
                          "units_per": r.units_per})
            paths.append(where)
        try:
            draft = pricing.build_draft(name=book.name, description=book.description, prices=prices,
                                        plan_rules=rules, prefix="price_book.", rule_paths=paths)
        except InvalidArgument as error:
            check.merge(error)
        check.check()
        return draft

    # -------------------------------------------------------------- estimates

    async def EstimateCost(self, request: pb.EstimateCostRequest, context: grpc.aio.ServicerContext
                           ) -> pb.EstimateCostResponse:
        if len(request.lines) + len(request.files) > MAX_ESTIMATE_ITEMS:
            raise InvalidArgument.field("files", f"at most {MAX_ESTIMATE_ITEMS:,} lines and files per request")
        book = await self._book(request.price_book_version, "price_book_version")
        check = _Check()
        lines: list[PricedLine] = []
        for i, line in enumerate(request.lines):
            where = f"lines[{i}]"
            if not line.service:
                check.add(f"{where}.service", "is required")
            if not line.operation:
                check.add(f"{where}.operation", "is required")
            units = _decimal(line.units, f"{where}.units", check, maximum=pricing.MAX_UNITS)
            if units is None or not line.service or not line.operation:
                continue
            try:
                lines.append(pricing.price_line(book, line.key, line.service, line.operation, units))
            except UnknownPrice as error:
                check.add(f"{where}.operation", str(error))
        files = []
        for i, f in enumerate(request.files):
            where = f"files[{i}]"
            if f.plan not in _PLAN_VALUES:
                check.add(f"{where}.plan", "a processing plan is required")
                continue
            bad = False
            for name in ("page_count", "ocr_page_count", "size_bytes"):
                if getattr(f, name) < 0:
                    check.add(f"{where}.{name}", "must not be negative")
                    bad = True
            if f.ocr_page_count > f.page_count and f.plan != common_pb2.PROCESSING_PLAN_IMAGE:
                check.add(f"{where}.ocr_page_count", "must not exceed page_count")
                bad = True
            if bad:
                continue
            facts = FileFacts(f.key, convert.plan_name(f.plan), f.page_count, f.ocr_page_count, f.size_bytes)
            files.append(pricing.estimate_file(book, facts))
        check.check()
        every_line = [*lines, *(line for f in files for line in f.lines)]
        return pb.EstimateCostResponse(
            price_book_version=book.version,
            lines=[_line_pb(line) for line in lines],
            files=[pb.FileEstimate(key=f.key, amount=money(f.amount), lines=[_line_pb(x) for x in f.lines])
                   for f in files],
            total=money(exact_sum(line.amount for line in every_line)),
            by_service=[_estimate_total_pb(t, by_operation=False)
                        for t in pricing.totals(every_line, by_operation=False)],
            by_operation=[_estimate_total_pb(t, by_operation=True)
                          for t in pricing.totals(every_line, by_operation=True)],
        )

    # ----------------------------------------------------------------- ledger

    async def RecordCosts(self, request: pb.RecordCostsRequest, context: grpc.aio.ServicerContext
                          ) -> pb.RecordCostsResponse:
        if len(request.events) > MAX_EVENTS:
            raise InvalidArgument.field("events", f"at most {MAX_EVENTS:,} events per request")
        if not request.events:
            return pb.RecordCostsResponse(total=money(0))
        if current_scope.get() == Scope.WORKER:
            self._check_worker_events(request.events)
        check = _Check()
        books: dict[int, PriceBook | None] = {}
        for version in {e.price_book_version for e in request.events}:
            if version < 0:
                books[version] = None
                continue
            try:
                books[version] = await self._store.price_book(version or None)
            except NotFound:
                if version == 0:
                    raise
                books[version] = None
        events = []
        ids: dict[str, tuple[uuid.UUID, str]] = {}
        for i, e in enumerate(request.events):
            event = self._event_in(e, f"events[{i}]", books, check, ids)
            if event is not None:
                events.append(event)
        check.check()
        recorded = await self._store.record_costs(events)
        self._metrics.recorded(recorded.fresh)
        distinct = {e.event_id: e.amount for e in recorded.events}
        encode = _EventEncoder()
        return pb.RecordCostsResponse(
            events=[encode(e) for e in recorded.events],
            replayed_count=recorded.replayed,
            total=money(exact_sum(distinct.values())),
        )

    def _check_worker_events(self, events: Sequence[pb.CostEvent]) -> None:
        """A worker token records only actual costs of runs dispatched to workers, each event
        carrying its run's grant (services/common/grants.py); anything else is refused."""
        for i, e in enumerate(events):
            if e.kind != pb.COST_KIND_ACTUAL:
                why = "is not an actual cost (a worker records only what its runs did)"
            elif not e.document_id:
                why = "names no document (a worker records costs of its runs only)"
            else:
                why = self._grants.refusal(
                    e.grant, e.session_id, e.document_id, _STAGE_NAMES.get(e.stage, ""),
                    e.attempt,
                )
            if why is not None:
                logger.warning("refused a worker's cost event %d of session %s: %s",
                               i, e.session_id[:80], why)
                raise PermissionDenied(f"events[{i}] {why}")

    @staticmethod
    def _event_in(e: pb.CostEvent, where: str, books: dict[int, PriceBook | None], check: _Check,
                  ids: dict[str, tuple[uuid.UUID, str]]) -> CostEvent | None:
        """One validated, priced event (None when it has problems, which `check` holds).

        `ids` caches parsed ids and their canonical text across a batch, which
        repeats its session and documents.
        """
        problems = check.count
        session = ids.get(e.session_id)
        if session is None:
            parsed = _uuid(e.session_id, f"{where}.session_id", check)
            if parsed is not None:
                session = ids[e.session_id] = (parsed, str(parsed))
        document = ids.get(e.document_id) if e.document_id else None
        if document is None and e.document_id:
            parsed = _uuid(e.document_id, f"{where}.document_id", check)
            if parsed is not None:
                document = ids[e.document_id] = (parsed, str(parsed))
        stage = _STAGE_NAMES.get(e.stage)
        if stage is None:
            check.add(f"{where}.stage", f"{e.stage} is not a stage")
        if e.attempt < 0:
            check.add(f"{where}.attempt", "must not be negative")
        kind = _KINDS.get(e.kind)
        if kind is None:
            check.add(f"{where}.kind", "COST_KIND_ESTIMATE or COST_KIND_ACTUAL is required")
        if not e.service:
            check.add(f"{where}.service", "is required")
        if not e.operation:
            check.add(f"{where}.operation", "is required")
        if len(e.category) > MAX_CATEGORY:
            check.add(f"{where}.category", f"is longer than {MAX_CATEGORY} characters")
        units = _decimal(e.units, f"{where}.units", check, maximum=pricing.MAX_UNITS)
        book = books.get(e.price_book_version)
        price = None
        if book is None:
            check.add(f"{where}.price_book_version", f"price book version {e.price_book_version} does not exist")
        elif e.service and e.operation:
            price = book.price(e.service, e.operation)
            if price is None:
                check.add(f"{where}.operation",
                          f"price book version {book.version} has no price for {e.service}/{e.operation}")
        if check.count != problems or price is None or units is None or book is None:
            return None
        assert session is not None and kind is not None and stage is not None
        cost = times(units, price.unit_price)
        return CostEvent(
            event_id=pricing.event_id(session[1], document[1] if document else None, stage, e.attempt,
                                      e.service, e.operation, kind),
            session_id=session[0],
            document_id=document[0] if document else None,
            stage=stage,
            attempt=e.attempt,
            service=e.service,
            operation=e.operation,
            kind=kind,
            units=units,
            unit_price=price.unit_price,
            amount=pricing.ZERO if e.cache_hit else cost,
            saved=cost if e.cache_hit else pricing.ZERO,
            cache_hit=e.cache_hit,
            category=e.category,
            price_book_version=book.version,
            occurred_at=convert.from_timestamp(e.occurred_at) if e.HasField("occurred_at") else None,
        )

    async def GetSessionCosts(self, request: pb.GetSessionCostsRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetSessionCostsResponse:
        check = _Check()
        session_id = _uuid(request.session_id, "session_id", check)
        if not 0 <= request.top_documents <= MAX_TOP_DOCUMENTS:
            check.add("top_documents", f"must be between 0 and {MAX_TOP_DOCUMENTS}")
        check.check()
        assert session_id is not None
        if request.totals_only:
            totals = await self._store.snapshot(session_id)
            return pb.GetSessionCostsResponse(
                session_id=str(totals.session_id),
                actual_total=money(totals.actual_total),
                estimate_total=money(totals.estimate_total),
                event_count=totals.event_count,
            )
        costs = await self._store.session_costs(session_id, top_documents=request.top_documents or 10)
        return pb.GetSessionCostsResponse(
            session_id=str(costs.session_id),
            actual_total=money(costs.actual_total),
            estimate_total=money(costs.estimate_total),
            by_service=[_group_pb(g) for g in costs.by_service],
            by_operation=[_group_pb(g) for g in costs.by_operation],
            by_stage=[_group_pb(g) for g in costs.by_stage],
            by_category=[_group_pb(g) for g in costs.by_category],
            top_documents=[pb.DocumentCost(document_id=str(d.document_id), category=d.category,
                                           amount=money(d.amount)) for d in costs.top_documents],
            cache_savings=money(costs.cache_savings),
            cache_hits=costs.cache_hits,
            event_count=costs.event_count,
            price_book_versions=costs.price_book_versions,
            estimate_by_service=[_group_pb(g) for g in costs.estimate_by_service],
        )

    async def ListCostEvents(self, request: pb.ListCostEventsRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListCostEventsResponse:
        check = _Check()
        session_id = _uuid(request.session_id, "session_id", check, required=False)
        document_id = _uuid(request.document_id, "document_id", check, required=False)
        if request.stage not in _STAGE_VALUES:
            check.add("stage", f"{request.stage} is not a stage")
        if request.kind and request.kind not in _KINDS:
            check.add("kind", f"{request.kind} is not a cost kind")
        if not request.session_id and not request.document_id:
            check.add("session_id", "a session_id or a document_id is required")
        check.check()
        where = EventFilter(
            session_id=session_id,
            document_id=document_id,
            stage=convert.stage_name(request.stage) or None,
            kind=_KINDS.get(request.kind),
            service=request.service or None,
        )
        size = convert.page_size(request.page_size)
        digest = _filter_digest(where)
        after = None
        cursor = convert.decode_page_token(request.page_token)
        if cursor is not None:
            if cursor.get("f") != digest:
                raise InvalidArgument.field("page_token", "was issued for other filters")
            after = (convert.cursor_time(cursor, "t"), convert.cursor_uuid(cursor, "id"))
        events = await self._store.list_cost_events(where, after=after, limit=size + 1)
        token = ""
        if len(events) > size:
            events = events[:size]
            last = events[-1]
            assert last.recorded_at is not None
            token = convert.encode_page_token(
                {"t": last.recorded_at.isoformat(), "id": str(last.event_id), "f": digest}
            )
        encode = _EventEncoder()
        return pb.ListCostEventsResponse(events=[encode(e) for e in events], next_page_token=token)

    async def WatchCosts(self, request: pb.WatchCostsRequest, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.WatchCostsResponse]:
        check = _Check()
        session_id = _uuid(request.session_id, "session_id", check)
        check.check()
        assert session_id is not None
        feed = self._store.changes
        with watching(self._metrics.watch_costs):
            async with feed.subscribe(session_id) as changed:
                last: tuple[Any, ...] | None = None
                while True:
                    changed.clear()
                    await feed.ensure_listening()
                    snapshot = await self._store.snapshot(session_id)
                    if last is None and not snapshot.known:
                        raise NotFound(
                            "session", str(session_id),
                            f"the cost service knows no session {session_id}: it has no budget "
                            "and no cost event",
                        )
                    state = (snapshot.actual_total, snapshot.estimate_total, snapshot.event_count, snapshot.budget)
                    if state != last:
                        last = state
                        yield _watch_pb(snapshot)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), timeout=self._settings.watch_poll_interval)
                    await asyncio.sleep(self._settings.watch_min_interval)

    # ---------------------------------------------------------------- budgets

    async def SetBudget(self, request: pb.SetBudgetRequest, context: grpc.aio.ServicerContext
                        ) -> pb.SetBudgetResponse:
        check = _Check()
        session_id = _uuid(request.session_id, "session_id", check)
        limit = None
        if not request.HasField("limit"):
            check.add("limit", "is required")
        else:
            limit = _money_in(request.limit, "limit", check)
        check.check()
        assert session_id is not None and limit is not None
        return pb.SetBudgetResponse(budget=_budget_pb(await self._store.set_budget(session_id, limit)))

    async def GetBudget(self, request: pb.GetBudgetRequest, context: grpc.aio.ServicerContext
                        ) -> pb.GetBudgetResponse:
        check = _Check()
        session_id = _uuid(request.session_id, "session_id", check)
        check.check()
        assert session_id is not None
        return pb.GetBudgetResponse(budget=_budget_pb(await self._store.get_budget(session_id)))

    async def ReserveBudget(self, request: pb.ReserveBudgetRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ReserveBudgetResponse:
        check = _Check()
        session_id = _uuid(request.session_id, "session_id", check)
        if not request.items:
            check.add("items", "at least one item is required")
        if len(request.items) > MAX_RESERVATIONS:
            raise InvalidArgument.field("items", f"at most {MAX_RESERVATIONS:,} items per request")
        items: list[tuple[str, Decimal, uuid.UUID | None]] = []
        for i, item in enumerate(request.items):
            if not item.key:
                check.add(f"items[{i}].key", "is required")
            elif len(item.key) > MAX_KEY:
                check.add(f"items[{i}].key", f"is longer than {MAX_KEY} characters")
            amount = _money_in(item.amount, f"items[{i}].amount", check)
            document_id = _uuid(item.document_id, f"items[{i}].document_id", check,
                                required=False)
            if amount is not None:
                items.append((item.key, amount, document_id))
        ttl = self._settings.reservation_ttl
        if request.HasField("ttl"):
            ttl = request.ttl.ToNanoseconds() / 1e9
            if not 0 < ttl <= MAX_TTL_SECONDS:
                check.add("ttl", f"must be positive and at most {MAX_TTL_SECONDS // 3600} hours")
        check.check()
        assert session_id is not None
        result = await self._store.reserve(session_id, items, ttl_seconds=ttl,
                                           allow_partial=request.allow_partial)
        return pb.ReserveBudgetResponse(
            reservations=[_reservation_pb(r) for r in result.reservations],
            budget=_budget_pb(result.budget),
            exhausted=result.exhausted,
        )

    async def SettleReservation(self, request: pb.SettleReservationRequest,
                                context: grpc.aio.ServicerContext) -> pb.SettleReservationResponse:
        check = _Check()
        if not request.settlements:
            check.add("settlements", "at least one settlement is required")
        if len(request.settlements) > MAX_RESERVATIONS:
            raise InvalidArgument.field("settlements", f"at most {MAX_RESERVATIONS:,} per request")
        settlements: list[tuple[uuid.UUID, Decimal]] = []
        for i, s in enumerate(request.settlements):
            rid = _uuid(s.reservation_id, f"settlements[{i}].reservation_id", check)
            actual = None
            if not s.HasField("actual"):
                check.add(f"settlements[{i}].actual", "is required")
            else:
                actual = _money_in(s.actual, f"settlements[{i}].actual", check)
            if rid is not None and actual is not None:
                settlements.append((rid, actual))
        check.check()
        closed = await self._store.settle(settlements)
        return pb.SettleReservationResponse(
            reservations=[_reservation_pb(r) for r in closed.reservations], budget=_budget_pb(closed.budget)
        )

    async def ReleaseReservation(self, request: pb.ReleaseReservationRequest,
                                 context: grpc.aio.ServicerContext) -> pb.ReleaseReservationResponse:
        check = _Check()
        if not request.reservation_ids:
            check.add("reservation_ids", "at least one reservation id is required")
        if len(request.reservation_ids) > MAX_RESERVATIONS:
            raise InvalidArgument.field("reservation_ids", f"at most {MAX_RESERVATIONS:,} per request")
        ids = [_uuid(text, f"reservation_ids[{i}]", check) for i, text in enumerate(request.reservation_ids)]
        check.check()
        closed = await self._store.release([rid for rid in ids if rid is not None])
        return pb.ReleaseReservationResponse(
            reservations=[_reservation_pb(r) for r in closed.reservations], budget=_budget_pb(closed.budget)
        )
