"""All SQL of the cost service: price books, the cost ledger (budgets: budgets.py).

Owns the tables of the `cost` schema (`price_books`, `prices`, `plan_rules`,
`cost_events`, `budgets`, `reservations`) and nothing else; it returns
frozen dataclasses, never Records or protos. It does not own the pool (the
caller closes it, after `CostStore.close`, which gives back the one
connection held for LISTEN while WatchCosts streams are open).

Decisions:

- Price books are immutable, so a loaded version is cached forever; only
  "which version is current" is asked each time. Publishing (and loading the
  default book) holds a transaction-scoped advisory lock, so concurrent
  publishers get consecutive versions and concurrent first starts load the
  default exactly once.
- The ledger insert is one statement per batch (`INSERT ... SELECT FROM
  unnest(...) ON CONFLICT DO NOTHING`). An event's id is derived from its
  idempotency key, so the rows a batch did not insert (replays) are read back
  by primary key and the answer is the first recording, unchanged.
- Budgets and reservations: their methods and SQL are in budgets.py
  (`Budgets`, a part of this class): a budget's spent amount is the ledger.
- Change feed: NOTIFY `docimport_cost` with the session id when a session's
  ledger (the insert statement itself) or budget (a trigger) changes; one
  pooled connection LISTENs while at least one watcher is subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from services.common import db
from services.common.errors import (
    NotFound,
)
from services.cost import pricing
from services.cost.budgets import Budget, Budgets
from services.cost.pricing import ZERO, PlanRule, Price, PriceBook, PriceBookDraft

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key of price book publishing ("cost.pb" in hex-ish).
PUBLISH_LOCK = 0x636F73742E7062
DEFAULT_BOOK_REQUEST_ID = "default-price-book"
NOTIFY_CHANNEL = "docimport_cost"


# --------------------------------------------------------------------- records


@dataclass(frozen=True)
class CostEvent:
    """One ledger entry; `recorded_at` is None until it is stored."""

    event_id: uuid.UUID
    session_id: uuid.UUID
    document_id: uuid.UUID | None
    stage: str
    attempt: int
    service: str
    operation: str
    kind: str
    units: Decimal
    unit_price: Decimal
    amount: Decimal
    saved: Decimal
    cache_hit: bool
    category: str
    price_book_version: int
    occurred_at: dt.datetime | None
    recorded_at: dt.datetime | None = None


@dataclass(frozen=True)
class Recorded:
    """The stored events of a batch in request order, and how many were replays."""

    events: tuple[CostEvent, ...]
    replayed: int
    # The events this call inserted (each ledger row is new exactly once).
    fresh: tuple[CostEvent, ...] = ()


@dataclass(frozen=True)
class CostGroup:
    """Actual (or estimated) amounts of one group of a session's events."""

    key: str
    service: str = ""
    operation: str = ""
    stage: str = ""
    units: Decimal | None = None
    amount: Decimal = ZERO
    event_count: int = 0


@dataclass(frozen=True)
class DocumentTotal:
    document_id: uuid.UUID
    category: str
    amount: Decimal


@dataclass(frozen=True)
class SessionCosts:
    session_id: uuid.UUID
    actual_total: Decimal
    estimate_total: Decimal
    by_service: tuple[CostGroup, ...]
    by_operation: tuple[CostGroup, ...]
    by_stage: tuple[CostGroup, ...]
    by_category: tuple[CostGroup, ...]
    estimate_by_service: tuple[CostGroup, ...]
    top_documents: tuple[DocumentTotal, ...]
    cache_savings: Decimal
    cache_hits: int
    event_count: int
    price_book_versions: tuple[int, ...]


@dataclass(frozen=True)
class CostSnapshot:
    """What WatchCosts streams: running totals and the budget, if any."""

    session_id: uuid.UUID
    actual_total: Decimal
    estimate_total: Decimal
    event_count: int
    budget: Budget | None
    # The ledger holds an event of the session (an estimate or an actual cost).
    has_events: bool = False

    @property
    def known(self) -> bool:
        """Whether this service knows the session at all: a budget or a ledger event."""
        return self.budget is not None or self.has_events


@dataclass(frozen=True)
class EventFilter:
    session_id: uuid.UUID | None = None
    document_id: uuid.UUID | None = None
    stage: str | None = None
    kind: str | None = None
    service: str | None = None


# ------------------------------------------------------------------------- SQL

_EVENT_COLUMNS = (
    "event_id, session_id, document_id, stage, attempt, service, operation, kind, units, "
    "unit_price, amount, saved, cache_hit, category, price_book_version, occurred_at, recorded_at"
)

# One round trip per batch: insert what is new, and NOTIFY the sessions that
# changed (the scalar subquery runs once, and only when a row was inserted).
# Amounts travel as exact decimal text: asyncpg's binary encoding of Decimal
# costs about twice as much CPU as str() and the server's numeric parse.
_INSERT_EVENTS = """
WITH ins AS (
    INSERT INTO cost.cost_events (event_id, session_id, document_id, stage, attempt, service,
        operation, kind, units, unit_price, amount, saved, cache_hit, category,
        price_book_version, occurred_at)
    SELECT e.event_id, e.session_id, e.document_id, e.stage, e.attempt, e.service, e.operation,
        e.kind, e.units::numeric, e.unit_price::numeric, e.amount::numeric, e.saved::numeric,
        e.cache_hit, e.category, e.price_book_version, coalesce(e.occurred_at, now())
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::int[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                $13::bool[], $14::text[], $15::int[], $16::timestamptz[])
        AS e(event_id, session_id, document_id, stage, attempt, service, operation, kind, units,
             unit_price, amount, saved, cache_hit, category, price_book_version, occurred_at)
    ON CONFLICT DO NOTHING
    RETURNING event_id, session_id, occurred_at, recorded_at
), notified AS (
    SELECT pg_notify('docimport_cost', s::text) FROM (SELECT DISTINCT session_id AS s FROM ins) d
)
SELECT event_id, occurred_at, recorded_at, (SELECT count(*) FROM notified) AS notified FROM ins
"""

_SESSION_GROUPS = """
SELECT kind, service, operation, stage, category,
       GROUPING(service, operation, stage, category) AS grouping,
       sum(units) AS units, sum(amount) AS amount, sum(saved) AS saved,
       count(*) AS events, count(*) FILTER (WHERE cache_hit) AS cache_hits
FROM cost.cost_events
WHERE session_id = $1
GROUP BY GROUPING SETS ((kind), (kind, service), (kind, service, operation),
                        (kind, stage), (kind, category))
"""
# GROUPING() bit masks (1 = column not grouped) of the grouping sets above.
_TOTAL, _BY_SERVICE, _BY_OPERATION, _BY_STAGE, _BY_CATEGORY = 15, 7, 3, 13, 14

def _event(row: asyncpg.Record) -> CostEvent:
    return CostEvent(
        row["event_id"], row["session_id"], row["document_id"], row["stage"], row["attempt"],
        row["service"], row["operation"], row["kind"], row["units"], row["unit_price"],
        row["amount"], row["saved"], row["cache_hit"], row["category"],
        row["price_book_version"], row["occurred_at"], row["recorded_at"],
    )


def _as_recorded(e: CostEvent, occurred_at: dt.datetime, recorded_at: dt.datetime) -> CostEvent:
    """`e` with the times the database gave it (positional: twice as fast as replace())."""
    return CostEvent(e.event_id, e.session_id, e.document_id, e.stage, e.attempt, e.service, e.operation,
                     e.kind, e.units, e.unit_price, e.amount, e.saved, e.cache_hit, e.category,
                     e.price_book_version, occurred_at, recorded_at)


# ----------------------------------------------------------------------- store


# Seconds the current price book's version is reused without asking Postgres
# (RecordCosts and estimates ask for it on every call). A publish through this
# replica takes effect at once; one through another replica within this time.
CURRENT_VERSION_TTL = 1.0


class CostStore(Budgets):
    """The cost service's persistence, on a pool the caller owns."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._books: dict[int, PriceBook] = {}
        # (version, monotonic time read) of the current price book; see CURRENT_VERSION_TTL.
        self._current: tuple[int, float] | None = None
        self.changes = ChangeFeed(pool)
        # RecordCosts comes once a delivery of stage runs, one short statement after another,
        # from every worker process at once: up to four connections are kept for it (no pool
        # reset round trip per call; see db.HeldConnection).
        self._ledger = db.HeldConnection(pool, keep=4)

    async def close(self) -> None:
        """Gives back the LISTEN and the ledger's connections (before the pool is closed)."""
        await self.changes.close()
        await self._ledger.close()

    # ------------------------------------------------------------ price books

    async def current_version(self) -> int | None:
        """The newest published version (asked at most every CURRENT_VERSION_TTL seconds)."""
        cached, now = self._current, time.monotonic()
        if cached is not None and now - cached[1] < CURRENT_VERSION_TTL:
            return cached[0]
        version = await self._pool.fetchval("SELECT max(version) FROM cost.price_books")
        self._current = (version, now) if version is not None else None
        return version

    async def price_book(self, version: int | None = None) -> PriceBook:
        """A version (None: the current one); NOT_FOUND when there is none."""
        if version is None:
            version = await self.current_version()
            if version is None:
                raise NotFound("price book", "current", "no price book has been published")
        book = self._books.get(version)
        if book is None:
            async with self._pool.acquire() as conn:
                book = await self._load_book(conn, version)
        return book

    async def _load_book(self, conn: asyncpg.Connection, version: int) -> PriceBook:
        cached = self._books.get(version)
        if cached is not None:
            return cached
        head = await conn.fetchrow(
            "SELECT version, name, description, published_at FROM cost.price_books WHERE version = $1",
            version,
        )
        if head is None:
            raise NotFound("price book", str(version), f"price book version {version} does not exist")
        prices = await conn.fetch(
            "SELECT service, operation, unit, unit_price, description FROM cost.prices "
            "WHERE version = $1 ORDER BY service, operation",
            version,
        )
        rules = await conn.fetch(
            "SELECT plan, stage, service, operation, basis, units_per FROM cost.plan_rules "
            "WHERE version = $1 ORDER BY plan, stage, service, operation, basis",
            version,
        )
        book = PriceBook(
            head["version"], head["name"], head["description"], head["published_at"],
            tuple(Price(r["service"], r["operation"], r["unit"], r["unit_price"], r["description"])
                  for r in prices),
            tuple(PlanRule(r["plan"], r["stage"], r["service"], r["operation"], r["basis"],
                           r["units_per"]) for r in rules),
        )
        self._books[version] = book
        return book

    async def list_price_books(self, *, before: int | None, limit: int) -> list[PriceBook]:
        """Versions below `before` (all when None), newest first."""
        versions = await self._pool.fetch(
            "SELECT version FROM cost.price_books WHERE $1::int IS NULL OR version < $1 "
            "ORDER BY version DESC LIMIT $2",
            before, limit,
        )
        books = []
        async with self._pool.acquire() as conn:
            for row in versions:
                books.append(await self._load_book(conn, row["version"]))
        return books

    async def publish_price_book(self, draft: PriceBookDraft, request_id: str | None) -> PriceBook:
        """Publishes `draft` as the next version; the same request_id publishes once."""
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PUBLISH_LOCK)
                if request_id:
                    existing = await conn.fetchval(
                        "SELECT version FROM cost.price_books WHERE request_id = $1", request_id
                    )
                    if existing is not None:
                        version = existing
                    else:
                        version = await self._insert_book(conn, draft, request_id)
                else:
                    version = await self._insert_book(conn, draft, None)
            self._current = None  # this replica prices with the new book at once
            return await self._load_book(conn, version)

    async def ensure_default_price_book(self, path: Path, cpu_second_rate: Decimal | None) -> PriceBook:
        """Loads the book file as version 1 when the ledger has no book; safe to race.

        `cpu_second_rate` replaces the price of local/compute_second. A ledger
        that already has books is left alone (a published version never
        changes); a differing configured rate is logged.
        """
        draft = pricing.parse_price_book_toml(Path(path).read_text(), field_name=str(path))
        if cpu_second_rate is not None:
            rate = Decimal(cpu_second_rate)
            if not rate.is_finite() or rate < 0 or pricing.places(rate) > pricing.PLACES:
                raise ValueError(
                    f"DOCIMPORT_CPU_SECOND_RATE={cpu_second_rate}: a non-negative decimal with "
                    f"at most {pricing.PLACES} fractional digits"
                )
            if draft.prices and not any(
                (p.service, p.operation) == ("local", "compute_second") for p in draft.prices
            ):
                raise ValueError(f"{path} has no local/compute_second price to set the CPU rate of")
            draft = draft.with_price("local", "compute_second", rate)
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PUBLISH_LOCK)
                current = await conn.fetchval("SELECT max(version) FROM cost.price_books")
                if current is None:
                    current = await self._insert_book(conn, draft, DEFAULT_BOOK_REQUEST_ID)
                    logger.info("loaded the default price book as version %d", current,
                                extra={"price_book": str(path)})
            book = await self._load_book(conn, current)
        configured = book.price("local", "compute_second")
        if cpu_second_rate is not None and configured and configured.unit_price != Decimal(cpu_second_rate):
            logger.warning(
                "DOCIMPORT_CPU_SECOND_RATE=%s differs from price book version %d (%s); "
                "publish a new version to change it", cpu_second_rate, book.version,
                configured.unit_price,
            )
        return book

    async def _insert_book(self, conn: asyncpg.Connection, draft: PriceBookDraft,
                           request_id: str | None) -> int:
        """Inserts the next version; the caller holds PUBLISH_LOCK."""
        version = await conn.fetchval("SELECT coalesce(max(version), 0) + 1 FROM cost.price_books")
        await conn.execute(
            "INSERT INTO cost.price_books (version, name, description, request_id, source_toml) "
            "VALUES ($1, $2, $3, $4, $5)",
            version, draft.name, draft.description, request_id, draft.source_toml,
        )
        await conn.execute(
            "INSERT INTO cost.prices (version, service, operation, unit, unit_price, description) "
            "SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::numeric[], $6::text[])",
            version,
            [p.service for p in draft.prices],
            [p.operation for p in draft.prices],
            [p.unit for p in draft.prices],
            [p.unit_price for p in draft.prices],
            [p.description for p in draft.prices],
        )
        await conn.execute(
            "INSERT INTO cost.plan_rules (version, plan, stage, service, operation, basis, units_per) "
            "SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], "
            "$7::numeric[])",
            version,
            [r.plan for r in draft.plan_rules],
            [r.stage for r in draft.plan_rules],
            [r.service for r in draft.plan_rules],
            [r.operation for r in draft.plan_rules],
            [r.basis for r in draft.plan_rules],
            [r.units_per for r in draft.plan_rules],
        )
        return version

    # ----------------------------------------------------------------- ledger

    async def record_costs(self, events: Sequence[CostEvent]) -> Recorded:
        """Stores priced events; replays (same key) answer with the first recording."""
        if not events:
            return Recorded((), 0)
        unique: dict[uuid.UUID, CostEvent] = {}
        for event in events:
            unique.setdefault(event.event_id, event)
        batch = list(unique.values())
        async with self._ledger.acquire() as conn:
            rows = await conn.fetch(
                _INSERT_EVENTS,
                [e.event_id for e in batch],
                [e.session_id for e in batch],
                [e.document_id for e in batch],
                [e.stage for e in batch],
                [e.attempt for e in batch],
                [e.service for e in batch],
                [e.operation for e in batch],
                [e.kind for e in batch],
                [str(e.units) for e in batch],
                [str(e.unit_price) for e in batch],
                [str(e.amount) for e in batch],
                [str(e.saved) for e in batch],
                [e.cache_hit for e in batch],
                [e.category for e in batch],
                [e.price_book_version for e in batch],
                [e.occurred_at for e in batch],
            )
            stored: dict[uuid.UUID, CostEvent] = {
                row["event_id"]: _as_recorded(unique[row["event_id"]], row["occurred_at"], row["recorded_at"])
                for row in rows
            }
            missing = [event_id for event_id in unique if event_id not in stored]
            if missing:
                for row in await conn.fetch(
                    f"SELECT {_EVENT_COLUMNS} FROM cost.cost_events WHERE event_id = ANY($1::uuid[])",
                    missing,
                ):
                    stored[row["event_id"]] = _event(row)
        lost = [event_id for event_id in unique if event_id not in stored]
        if lost:
            # Only a row written outside this store (another id for the same key) gets here.
            raise RuntimeError(f"ledger rows conflict on their key but not their id: {lost[:3]}")
        return Recorded(
            tuple(stored[e.event_id] for e in events),
            len(events) - len(rows),
            tuple(stored[row["event_id"]] for row in rows),
        )

    async def session_costs(self, session_id: uuid.UUID, *, top_documents: int) -> SessionCosts:
        """Every total of one session, from one consistent snapshot."""
        async with self._pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                groups = await conn.fetch(_SESSION_GROUPS, session_id)
                top = await conn.fetch(
                    "SELECT document_id, max(category) AS category, sum(amount) AS amount "
                    "FROM cost.cost_events "
                    "WHERE session_id = $1 AND kind = 'actual' AND document_id IS NOT NULL "
                    "GROUP BY document_id ORDER BY sum(amount) DESC, document_id LIMIT $2",
                    session_id, top_documents,
                )
                versions = await conn.fetch(
                    "SELECT DISTINCT price_book_version FROM cost.cost_events WHERE session_id = $1 "
                    "ORDER BY 1",
                    session_id,
                )
        totals = {"actual": ZERO, "estimate": ZERO}
        cache_savings, cache_hits, event_count = ZERO, 0, 0
        sections: dict[tuple[str, int], list[CostGroup]] = {}
        for row in groups:
            kind, grouping = row["kind"], row["grouping"]
            if grouping == _TOTAL:
                totals[kind] = row["amount"]
                if kind == "actual":
                    cache_savings, cache_hits, event_count = row["saved"], row["cache_hits"], row["events"]
                continue
            if grouping == _BY_SERVICE:
                group = CostGroup(row["service"], service=row["service"])
            elif grouping == _BY_OPERATION:
                group = CostGroup(f"{row['service']}/{row['operation']}", service=row["service"],
                                  operation=row["operation"], units=row["units"])
            elif grouping == _BY_STAGE:
                group = CostGroup(row["stage"], stage=row["stage"])
            else:
                group = CostGroup(row["category"])
            group = replace(group, amount=row["amount"], event_count=row["events"])
            sections.setdefault((kind, grouping), []).append(group)

        def section(kind: str, grouping: int) -> tuple[CostGroup, ...]:
            found = sections.get((kind, grouping), [])
            return tuple(sorted(found, key=lambda g: (-g.amount, g.key)))

        return SessionCosts(
            session_id=session_id,
            actual_total=totals["actual"],
            estimate_total=totals["estimate"],
            by_service=section("actual", _BY_SERVICE),
            by_operation=section("actual", _BY_OPERATION),
            by_stage=section("actual", _BY_STAGE),
            by_category=section("actual", _BY_CATEGORY),
            estimate_by_service=section("estimate", _BY_SERVICE),
            top_documents=tuple(DocumentTotal(r["document_id"], r["category"], r["amount"]) for r in top),
            cache_savings=cache_savings,
            cache_hits=cache_hits,
            event_count=event_count,
            price_book_versions=tuple(r["price_book_version"] for r in versions),
        )

    async def list_cost_events(self, where: EventFilter, *, after: tuple[dt.datetime, uuid.UUID] | None,
                               limit: int) -> list[CostEvent]:
        """Events matching `where` in recording order, after the cursor."""
        clauses, args = [], []
        for column, value in (
            ("session_id", where.session_id),
            ("document_id", where.document_id),
            ("stage", where.stage),
            ("kind", where.kind),
            ("service", where.service),
        ):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} = ${len(args)}")
        if after is not None:
            args.extend(after)
            clauses.append(f"(recorded_at, event_id) > (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM cost.cost_events "
            f"{'WHERE ' + ' AND '.join(clauses) if clauses else ''} "
            f"ORDER BY recorded_at, event_id LIMIT ${len(args)}"
        )
        return [_event(row) for row in await self._pool.fetch(sql, *args)]

    async def snapshot(self, session_id: uuid.UUID) -> CostSnapshot:
        """The session's ledger totals and budget: its folded totals plus the deltas not folded yet.

        One statement reads both, so it sees a fold entirely or not at all.
        """
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                """
                SELECT coalesce(sum(events) FILTER (WHERE kind = 'actual'), 0)::bigint AS events,
                       coalesce(sum(amount) FILTER (WHERE kind = 'actual'), 0) AS actual,
                       coalesce(sum(amount) FILTER (WHERE kind = 'estimate'), 0) AS estimate,
                       coalesce(sum(events), 0) > 0 AS has_events
                FROM (SELECT kind, events, amount FROM cost.session_totals WHERE session_id = $1
                      UNION ALL
                      SELECT kind, events, amount FROM cost.session_total_deltas
                      WHERE session_id = $1) t
                """,
                session_id,
            )
            budget = await self.read_budget(conn, session_id)
        return CostSnapshot(session_id, row["actual"], row["estimate"], row["events"], budget,
                            row["has_events"])

    async def fold_totals(self) -> None:
        """Adds the ledger-total deltas written so far to `session_totals`.

        One statement: the deltas it deletes and the totals it adds commit
        together, so a reader counts each event once. Deltas written meanwhile
        wait for the next fold; replicas folding at once each fold what the
        others did not (a delta row is deleted once).
        """
        await self._pool.execute(
            """
            WITH gone AS (DELETE FROM cost.session_total_deltas RETURNING *)
            INSERT INTO cost.session_totals AS t (session_id, kind, events, amount)
            SELECT session_id, kind, sum(events), sum(amount) FROM gone
            GROUP BY session_id, kind ORDER BY session_id, kind
            ON CONFLICT (session_id, kind) DO UPDATE SET
                events = t.events + excluded.events, amount = t.amount + excluded.amount
            """
        )

# ----------------------------------------------------------------- change feed


class ChangeFeed:
    """Wakes WatchCosts streams when their session's ledger or budget changes.

    One pooled connection LISTENs on `docimport_cost` while anyone is
    subscribed, and is given back when the last subscriber leaves (or on
    `close`). Subscribers also poll on a timeout, so a lost notification (a
    dropped connection) only delays an update.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._subscribers: dict[str, set[asyncio.Event]] = {}
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def subscriber_count(self) -> int:
        return sum(len(events) for events in self._subscribers.values())

    @property
    def listening(self) -> bool:
        return self._conn is not None and _alive(self._conn)

    @contextlib.asynccontextmanager
    async def subscribe(self, session_id: uuid.UUID) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the session changes; the caller clears it."""
        event = asyncio.Event()
        key = str(session_id)
        self._subscribers.setdefault(key, set()).add(event)
        try:
            await self.ensure_listening()
            yield event
        finally:
            events = self._subscribers.get(key)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._subscribers[key]
            if not self._subscribers:
                # Not awaited here: this may run while the task is being cancelled.
                task = asyncio.get_running_loop().create_task(self._stop_if_idle())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def ensure_listening(self) -> None:
        """(Re)starts listening when someone is subscribed and the connection is gone."""
        if self.listening or not self._subscribers:
            return
        async with self._lock:
            if self.listening or not self._subscribers:
                return
            await self._drop()
            conn = await self._pool.acquire()
            try:
                await conn.add_listener(NOTIFY_CHANNEL, self._notified)
            except BaseException:
                await self._pool.release(conn)
                raise
            conn.add_termination_listener(self._terminated)
            self._conn = conn
        # Anything may have changed while nobody listened.
        self._wake_all()

    def _wake_all(self) -> None:
        for events in self._subscribers.values():
            for event in events:
                event.set()

    def _terminated(self, _conn: object) -> None:
        """The LISTEN connection was lost: wake every stream, which re-listens and re-reads."""
        logger.warning("the LISTEN connection was lost; listening again")
        self._wake_all()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        for event in self._subscribers.get(payload, ()):
            event.set()

    async def _stop_if_idle(self) -> None:
        async with self._lock:
            if not self._subscribers:
                await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or not _alive(conn):
            # A lost connection has already gone back to the pool by itself.
            return
        try:
            conn.remove_termination_listener(self._terminated)
            await conn.remove_listener(NOTIFY_CHANNEL, self._notified)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            logger.warning("could not UNLISTEN; dropping the connection", exc_info=True)
        finally:
            with contextlib.suppress(asyncpg.InterfaceError):
                await self._pool.release(conn)

    async def close(self) -> None:
        async with self._lock:
            self._subscribers.clear()
            await self._drop()


def _alive(conn: Any) -> bool:
    """Whether a pooled connection is still ours and open (a lost one detaches itself)."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False
