"""Budgets and reservations: the cost service's SQL for what a session may still spend.

Owns the tables `cost.budgets` and `cost.reservations`; `CostStore`
(store.py) has these methods as well as its ledger's, on the same pool.

One sum, one truth: a budget's `spent` is the session's ledger total (every
actual charge, whatever became of its run: succeeded, failed, lost,
expired or cancelled), read from the ledger's folded totals plus the deltas
not folded yet, so it equals the ledger at every moment. `reserved` is what
open reservations still hold beyond what their documents were already
charged: a document admitted with an estimate of $1 and charged $0.40 so
far holds $0.60 more, so that its charges are not counted twice.
`remaining` = limit - reserved - spent.

Every write to a budget (reserve, settle, release, expiry) first locks its
row, then expires the session's overdue reservations; a reservation is
granted only when it fits in what remains under that lock, so concurrent
reservations cannot overdraw. Settling closes a reservation with its
document's charges in the ledger (its `actual`; beyond the reservation's
amount is overrun). Reads take no lock: an overdue reservation stops
counting at once, even before a write or the sweep marks it expired.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

import asyncpg

from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
)
from services.cost.pricing import EXACT, ZERO


@dataclass(frozen=True)
class Budget:
    session_id: uuid.UUID
    limit: Decimal
    reserved: Decimal
    spent: Decimal
    overrun: Decimal
    updated_at: dt.datetime

    @property
    def remaining(self) -> Decimal:
        """limit - reserved - spent, never below zero."""
        left = EXACT.subtract(EXACT.subtract(self.limit, self.reserved), self.spent)
        return max(left, ZERO)


@dataclass(frozen=True)
class Reservation:
    reservation_id: uuid.UUID
    session_id: uuid.UUID
    key: str
    amount: Decimal
    actual: Decimal | None
    state: str
    expires_at: dt.datetime


@dataclass(frozen=True)
class Reserved:
    reservations: tuple[Reservation, ...]
    budget: Budget
    exhausted: bool


@dataclass(frozen=True)
class Closed:
    """Reservations after a settle or release, and their session's budget."""

    reservations: tuple[Reservation, ...]
    budget: Budget


# One item to reserve: (idempotency key, amount, the document it admits or None).
Item = tuple[str, Decimal, uuid.UUID | None]

_RESERVATION_COLUMNS = "reservation_id, session_id, key, amount, actual, state, expires_at"

# The charges of a session's document (settling; what an open reservation still holds).
_CHARGED = """
    SELECT sum(e.amount) FROM cost.cost_events e
    WHERE e.document_id = r.document_id AND e.session_id = r.session_id AND e.kind = 'actual'
"""

# Budgets as they are shown and enforced (see the module docstring); WHERE is filled in.
_BUDGETS = f"""
SELECT b.session_id, b.limit_amount, coalesce(h.held, 0) AS reserved,
       coalesce(t.actual, 0) AS spent, b.overrun, b.updated_at
FROM cost.budgets b
LEFT JOIN LATERAL (
    SELECT sum(x.amount) AS actual FROM (
        SELECT amount FROM cost.session_totals
        WHERE session_id = b.session_id AND kind = 'actual'
        UNION ALL
        SELECT amount FROM cost.session_total_deltas
        WHERE session_id = b.session_id AND kind = 'actual') x
) t ON true
LEFT JOIN LATERAL (
    SELECT sum(greatest(r.amount - coalesce(
               CASE WHEN r.document_id IS NOT NULL THEN ({_CHARGED}) END, 0), 0)) AS held
    FROM cost.reservations r
    WHERE r.session_id = b.session_id AND r.state = 'open' AND r.expires_at > now()
) h ON true
WHERE """

_READ_BUDGET = _BUDGETS + "b.session_id = $1"

# Closes the session's overdue reservations (the stored sum of open amounts follows).
_EXPIRE = """
WITH gone AS (
    UPDATE cost.reservations SET state = 'expired', closed_at = now()
    WHERE session_id = $1 AND state = 'open' AND expires_at <= now()
    RETURNING amount
)
UPDATE cost.budgets
SET reserved = reserved - (SELECT sum(amount) FROM gone), updated_at = now()
WHERE session_id = $1 AND EXISTS (SELECT 1 FROM gone)
"""


def _budget(row: asyncpg.Record) -> Budget:
    return Budget(row["session_id"], row["limit_amount"], row["reserved"], row["spent"],
                  row["overrun"], row["updated_at"])


def _reservation(row: asyncpg.Record) -> Reservation:
    return Reservation(row["reservation_id"], row["session_id"], row["key"], row["amount"],
                       row["actual"], row["state"], row["expires_at"])


def fmt(value: Decimal) -> str:
    return format(value.normalize(EXACT), "f") if value else "0"


class Budgets:
    """The budget half of `CostStore` (it provides `_pool`)."""

    _pool: asyncpg.Pool

    async def read_budget(self, conn: asyncpg.Connection, session_id: uuid.UUID) -> Budget | None:
        row = await conn.fetchrow(_READ_BUDGET, session_id)
        return _budget(row) if row else None

    async def recent_budgets(self, within: float) -> list[Budget]:
        """Budgets with open reservations or changed in the last `within` seconds (for /metrics)."""
        rows = await self._pool.fetch(
            _BUDGETS + "b.reserved > 0 OR b.updated_at > now() - make_interval(secs => $1)",
            within,
        )
        return [_budget(row) for row in rows]

    async def set_budget(self, session_id: uuid.UUID, limit: Decimal) -> Budget:
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO cost.budgets (session_id, limit_amount) VALUES ($1, $2) "
                    "ON CONFLICT ON CONSTRAINT budgets_pkey "
                    "DO UPDATE SET limit_amount = EXCLUDED.limit_amount, updated_at = now()",
                    session_id, limit,
                )
                await conn.execute(_EXPIRE, session_id)
                return _budget(await conn.fetchrow(_READ_BUDGET, session_id))

    async def get_budget(self, session_id: uuid.UUID) -> Budget:
        row = await self._pool.fetchrow(_READ_BUDGET, session_id)
        if row is None:
            raise NotFound("budget", str(session_id), f"session {session_id} has no budget")
        return _budget(row)

    async def _lock_and_expire(self, conn: asyncpg.Connection, session_id: uuid.UUID) -> Budget:
        if not await conn.fetchval(
            "SELECT true FROM cost.budgets WHERE session_id = $1 FOR UPDATE", session_id
        ):
            raise NotFound("budget", str(session_id), f"session {session_id} has no budget")
        await conn.execute(_EXPIRE, session_id)
        return _budget(await conn.fetchrow(_READ_BUDGET, session_id))

    async def reserve(self, session_id: uuid.UUID, items: Sequence[Item], *,
                      ttl_seconds: float, allow_partial: bool) -> Reserved:
        """Holds budget for each (key, amount, document), all or nothing unless `allow_partial`.

        A key reserved before answers with its first reservation and holds
        nothing more. Refused: ResourceExhausted naming limit, reserved, spent.
        """
        refusal: ResourceExhausted | None = None
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                budget = await self._lock_and_expire(conn, session_id)
                keys = list(dict.fromkeys(key for key, _, _ in items))
                existing = {
                    row["key"]: _reservation(row)
                    for row in await conn.fetch(
                        f"SELECT {_RESERVATION_COLUMNS} FROM cost.reservations "
                        "WHERE session_id = $1 AND key = ANY($2::text[])",
                        session_id, keys,
                    )
                }
                available = budget.remaining
                wanted: dict[str, tuple[Decimal, uuid.UUID | None]] = {}
                asked = ZERO
                exhausted = False
                granted_any = False
                for key, amount, document_id in items:
                    if key in existing or key in wanted:
                        granted_any = True
                        continue
                    if EXACT.add(asked, amount) <= available:
                        wanted[key] = (amount, document_id)
                        asked = EXACT.add(asked, amount)
                        granted_any = True
                        continue
                    if allow_partial and granted_any:
                        exhausted = True
                        break
                    needed = amount if allow_partial else sum_new(items, existing)
                    refusal = _refused(budget, needed)
                    break
                if refusal is None and wanted:
                    rows = await conn.fetch(
                        "INSERT INTO cost.reservations (reservation_id, session_id, key, amount, "
                        "document_id, expires_at) "
                        "SELECT r.id, $1, r.key, r.amount, r.document_id, "
                        "now() + make_interval(secs => $6) "
                        "FROM unnest($2::uuid[], $3::text[], $4::numeric[], $5::uuid[]) "
                        "AS r(id, key, amount, document_id) "
                        f"RETURNING {_RESERVATION_COLUMNS}",
                        session_id, [uuid.uuid4() for _ in wanted], list(wanted),
                        [a for a, _ in wanted.values()], [d for _, d in wanted.values()],
                        ttl_seconds,
                    )
                    for row in rows:
                        existing[row["key"]] = _reservation(row)
                    await conn.execute(
                        "UPDATE cost.budgets SET reserved = reserved + $2, updated_at = now() "
                        "WHERE session_id = $1",
                        session_id, asked,
                    )
                    budget = _budget(await conn.fetchrow(_READ_BUDGET, session_id))
        if refusal is not None:
            raise refusal
        granted = []
        for key in dict.fromkeys(key for key, _, _ in items):
            if key not in existing:
                break
            granted.append(existing[key])
        return Reserved(tuple(granted), budget, exhausted)

    async def _closing(self, ids: Sequence[uuid.UUID], conn: asyncpg.Connection
                       ) -> tuple[uuid.UUID, dict[uuid.UUID, Reservation], dict[uuid.UUID, Decimal]]:
        """Locks the budget of the reservations `ids` (one session) and them; returns the
        session, the reservations and their documents' charges so far."""
        rows = await conn.fetch(
            "SELECT reservation_id, session_id FROM cost.reservations WHERE reservation_id = ANY($1::uuid[])",
            list(ids),
        )
        found = {row["reservation_id"]: row["session_id"] for row in rows}
        for rid in ids:
            if rid not in found:
                raise NotFound("reservation", str(rid))
        sessions = set(found.values())
        if len(sessions) > 1:
            raise InvalidArgument.field("reservation_ids", "the reservations belong to more than one session")
        session_id = sessions.pop()
        await self._lock_and_expire(conn, session_id)
        current, charged = {}, {}
        for row in await conn.fetch(
            f"SELECT {_RESERVATION_COLUMNS}, r.document_id IS NOT NULL AS known, "
            f"coalesce(({_CHARGED}), 0) AS charged FROM cost.reservations r "
            "WHERE reservation_id = ANY($1::uuid[]) FOR UPDATE",
            list(ids),
        ):
            current[row["reservation_id"]] = _reservation(row)
            if row["known"]:
                charged[row["reservation_id"]] = row["charged"]
        return session_id, current, charged

    async def settle(self, settlements: Sequence[tuple[uuid.UUID, Decimal]]) -> Closed:
        """Closes reservations with what their documents were charged (the ledger's sum, or the
        given actual for a reservation that names no document); an excess counts as overrun.

        Settling a settled reservation again is a no-op; an expired one can
        still be settled (the work was done); a released one cannot.
        """
        ids = list(dict.fromkeys(rid for rid, _ in settlements))
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                session_id, current, charged = await self._closing(ids, conn)
                freed, settled, overrun = ZERO, ZERO, ZERO
                changed: dict[uuid.UUID, Decimal] = {}
                for rid, given in settlements:
                    r = current[rid]
                    if r.state == "settled" or rid in changed:
                        continue
                    if r.state == "released":
                        raise FailedPrecondition(f"reservation {rid} was released; it cannot be settled",
                                                 subject=f"reservations/{rid}")
                    actual = charged.get(rid, given)
                    if r.state == "open":
                        freed = EXACT.add(freed, r.amount)
                    settled = EXACT.add(settled, actual)
                    overrun = EXACT.add(overrun, max(EXACT.subtract(actual, r.amount), ZERO))
                    current[rid] = replace(r, state="settled", actual=actual)
                    changed[rid] = actual
                if changed:
                    await conn.execute(
                        "UPDATE cost.reservations r SET state = 'settled', actual = s.actual, closed_at = now() "
                        "FROM unnest($1::uuid[], $2::numeric[]) AS s(id, actual) WHERE r.reservation_id = s.id",
                        list(changed), list(changed.values()),
                    )
                    await conn.execute(
                        "UPDATE cost.budgets SET reserved = reserved - $2, spent = spent + $3, "
                        "overrun = overrun + $4, updated_at = now() WHERE session_id = $1",
                        session_id, freed, settled, overrun,
                    )
                budget = _budget(await conn.fetchrow(_READ_BUDGET, session_id))
        return Closed(tuple(current[rid] for rid in ids), budget)

    async def release(self, ids: Sequence[uuid.UUID]) -> Closed:
        """Gives open reservations back (their documents' charges stay spent); released or
        expired ones are left as they are."""
        ids = list(dict.fromkeys(ids))
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                session_id, current, _ = await self._closing(ids, conn)
                freed = ZERO
                changed = []
                for rid in ids:
                    r = current[rid]
                    if r.state == "settled":
                        raise FailedPrecondition(f"reservation {rid} was settled; it cannot be released",
                                                 subject=f"reservations/{rid}")
                    if r.state == "open":
                        freed = EXACT.add(freed, r.amount)
                        current[rid] = replace(r, state="released")
                        changed.append(rid)
                if changed:
                    await conn.execute(
                        "UPDATE cost.reservations SET state = 'released', closed_at = now() "
                        "WHERE reservation_id = ANY($1::uuid[])",
                        changed,
                    )
                    await conn.execute(
                        "UPDATE cost.budgets SET reserved = reserved - $2, updated_at = now() "
                        "WHERE session_id = $1",
                        session_id, freed,
                    )
                budget = _budget(await conn.fetchrow(_READ_BUDGET, session_id))
        return Closed(tuple(current[rid] for rid in ids), budget)

    async def expire_reservations(self, *, sessions: int = 100) -> int:
        """Marks overdue reservations expired in up to `sessions` sessions; returns how many sessions."""
        due = await self._pool.fetch(
            "SELECT DISTINCT session_id FROM cost.reservations WHERE state = 'open' AND expires_at <= now() "
            "LIMIT $1",
            sessions,
        )
        for row in due:
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    await self._lock_and_expire(conn, row["session_id"])
        return len(due)


def sum_new(items: Sequence[Item], existing: dict[str, Reservation]) -> Decimal:
    """What the not-yet-reserved keys of `items` ask for in total."""
    seen: set[str] = set()
    total = ZERO
    for key, amount, _ in items:
        if key in existing or key in seen:
            continue
        seen.add(key)
        total = EXACT.add(total, amount)
    return total


def _refused(budget: Budget, requested: Decimal) -> ResourceExhausted:
    remaining = budget.remaining
    numbers = {
        "limit": fmt(budget.limit),
        "reserved": fmt(budget.reserved),
        "spent": fmt(budget.spent),
        "requested": fmt(requested),
        "remaining": fmt(remaining),
        "currency_code": "USD",
    }
    description = (
        f"limit {numbers['limit']} USD, reserved {numbers['reserved']}, spent {numbers['spent']}: "
        f"{numbers['requested']} more does not fit in the {numbers['remaining']} remaining"
    )
    return ResourceExhausted(
        f"the budget of session {budget.session_id} is exhausted: {description}",
        violations=[QuotaViolation(f"sessions/{budget.session_id}/budget", description)],
        metadata={**numbers, "session_id": str(budget.session_id)},
    )
