"""The session service's clients of its peers, the manifest and cost services.

Owns every call this service makes to another service, in domain terms:
plain dataclasses and Decimals in, the same out; what the peer answered
becomes the domain error of the same code, naming the peer
(`errors.peer_error`: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
RESOURCE_EXHAUSTED, UNAVAILABLE... never re-raised as INTERNAL); only a
peer's own bug (INTERNAL, UNKNOWN) or a refused service token stays an
AioRpcError. Callers that outlive a peer's trouble catch `PeerFailure`.
Calls carry a deadline. Does not own the channels (`server.serve` opens and
closes them). Besides the servicer and server, the only module that imports
other services' `_pb2`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import grpc
from docimport.cost.v1 import cost_service_pb2
from docimport.manifest.v1 import manifest_service_pb2

from services.common import convert
from services.common.errors import DomainError, NotFound, peer_error

ZERO = Decimal(0)
MANIFEST_SERVICE, COST_SERVICE = "manifest service", "cost service"
# What a call to a peer raises when the peer refused it or could not answer.
PeerFailure = (DomainError, grpc.aio.AioRpcError)


def describe(exc: BaseException) -> str:
    """A peer failure in a line, for logs and findings."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


def _money(message: Any) -> Decimal:
    if not message.amount:
        return ZERO
    return convert.parse_money(message, "amount", allow_negative=True, places=convert.LEDGER_PLACES)


async def _ask(
    method: Any, request: Any, timeout: float, peer: str, *, resource: str = "", name: str = ""
) -> Any:
    """`method(request)` with a deadline; the peer's error codes as domain errors."""
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise peer_error(exc, peer, resource=resource, name=name) from None


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestInfo:
    manifest_id: str
    case_name: str
    source_path: str
    ready: bool
    state_name: str
    file_count: int
    estimated_total: Decimal
    # The manifest's priced plan: (service, operation, units) and its book.
    estimate_lines: tuple[tuple[str, str, str], ...] = ()
    price_book_version: int = 0


@dataclass(frozen=True)
class ManifestFileInfo:
    file_id: str
    relative_path: str
    raw_path: bytes
    size_bytes: int
    sha256: str
    mime_type: str
    category: str
    priority: int
    plan: str
    page_count: int
    ocr_page_count: int
    problem_kind: str
    problem_message: str
    duplicate_of_path: str
    duplicate_of_file_id: str
    exclusion_reason: str
    # None when the manifest was not priced.
    estimated_cost: Decimal | None
    importable: bool
    # Set for an attachment of an e-mail: it is processed as part of that e-mail.
    family_parent_file_id: str = ""


class ManifestPeer:
    def __init__(self, stub: Any, timeout: float) -> None:
        self._stub = stub
        self._timeout = timeout

    async def get_manifest(self, manifest_id: str) -> ManifestInfo:
        response = await _ask(
            self._stub.GetManifest,
            manifest_service_pb2.GetManifestRequest(manifest_id=manifest_id),
            self._timeout,
            MANIFEST_SERVICE,
            resource="manifest",
            name=manifest_id,
        )
        m = response.manifest
        return ManifestInfo(
            manifest_id=m.manifest_id,
            case_name=m.case_name,
            source_path=m.source_path,
            ready=m.state == manifest_service_pb2.MANIFEST_STATE_READY,
            state_name=manifest_service_pb2.ManifestState.Name(m.state)
            .removeprefix("MANIFEST_STATE_")
            .lower(),
            file_count=m.summary.file_count,
            estimated_total=_money(m.summary.estimated_total),
            estimate_lines=tuple(
                (line.service, line.operation, line.units)
                for line in m.summary.estimated_by_operation
                if line.service and line.operation and line.units
            ),
            price_book_version=m.summary.price_book_version,
        )

    async def iter_files(
        self, manifest_id: str, page_size: int
    ) -> AsyncIterator[list[ManifestFileInfo]]:
        token = ""
        while True:
            response = await _ask(
                self._stub.ListManifestFiles,
                manifest_service_pb2.ListManifestFilesRequest(
                    manifest_id=manifest_id, page_size=page_size, page_token=token
                ),
                self._timeout,
                MANIFEST_SERVICE,
                resource="manifest",
                name=manifest_id,
            )
            yield [self._file(f) for f in response.files]
            token = response.next_page_token
            if not token:
                return

    @staticmethod
    def _file(f: Any) -> ManifestFileInfo:
        problem_kind = ""
        if f.HasField("problem") and f.problem.kind:
            problem_kind = (
                manifest_service_pb2.ProblemKind.Name(f.problem.kind)
                .removeprefix("PROBLEM_KIND_")
                .lower()
            )
        return ManifestFileInfo(
            file_id=f.file_id,
            relative_path=f.relative_path,
            raw_path=bytes(f.raw_path) or f.relative_path.encode(),
            size_bytes=f.size_bytes,
            sha256=f.sha256,
            mime_type=f.mime_type,
            category=f.category or "miscellaneous",
            priority=f.priority,
            plan=convert.plan_name(f.plan) or "unsupported",
            page_count=f.page_count,
            ocr_page_count=f.ocr_page_count,
            problem_kind=problem_kind,
            problem_message=f.problem.message if f.HasField("problem") else "",
            duplicate_of_path=f.duplicate_of_path,
            duplicate_of_file_id=f.duplicate_of_file_id,
            exclusion_reason=f.exclusion_reason,
            estimated_cost=_money(f.estimated_cost) if f.HasField("estimated_cost") else None,
            importable=f.importable,
            family_parent_file_id=f.family_parent_file_id,
        )


# -------------------------------------------------------------------- cost


@dataclass(frozen=True)
class Budget:
    limit: Decimal
    remaining: Decimal
    reserved: Decimal
    spent: Decimal


@dataclass(frozen=True)
class Reserved:
    # (reservation id, amount) in item order: the granted prefix.
    granted: list[tuple[str, Decimal]]
    exhausted: bool
    budget: Budget | None


class BudgetRefused(Exception):
    """Not even the first item fits the budget (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class FilePlanItem:
    key: str
    plan: str
    page_count: int
    ocr_page_count: int
    size_bytes: int


@dataclass(frozen=True)
class SessionCosts:
    actual_total: Decimal
    estimate_total: Decimal
    event_count: int


@dataclass
class CostEventIndex:
    """Actual cost events of a session, keyed by (document, stage, attempt)."""

    runs: dict[tuple[str, str, int], int] = field(default_factory=dict)
    # what each run was charged
    amounts: dict[tuple[str, str, int], Decimal] = field(default_factory=dict)
    total: Decimal = ZERO


def _budget(message: Any) -> Budget:
    return Budget(
        _money(message.limit),
        _money(message.remaining),
        _money(message.reserved),
        _money(message.spent),
    )


class CostPeer:
    def __init__(self, stub: Any, timeout: float) -> None:
        self._stub = stub
        self._timeout = timeout

    async def set_budget(self, session_id: str, limit: Decimal) -> None:
        await _ask(
            self._stub.SetBudget,
            cost_service_pb2.SetBudgetRequest(session_id=session_id, limit=convert.money(limit)),
            self._timeout,
            COST_SERVICE,
        )

    async def record_estimate(
        self, session_id: str, lines: Sequence[tuple[str, str, str]], price_book_version: int
    ) -> None:
        """Records the manifest's priced plan as the session's estimate events.

        Session-level events (no document, no stage, attempt 0): replaying
        them is a no-op, so a retried create never doubles the estimate.
        """
        events = [
            cost_service_pb2.CostEvent(
                session_id=session_id,
                service=service,
                operation=operation,
                units=units,
                kind=cost_service_pb2.COST_KIND_ESTIMATE,
                price_book_version=price_book_version,
            )
            for service, operation, units in lines
        ]
        if events:
            await _ask(
                self._stub.RecordCosts,
                cost_service_pb2.RecordCostsRequest(events=events),
                self._timeout,
                COST_SERVICE,
            )

    async def get_budget(self, session_id: str) -> Budget | None:
        try:
            response = await _ask(
                self._stub.GetBudget,
                cost_service_pb2.GetBudgetRequest(session_id=session_id),
                self._timeout,
                COST_SERVICE,
            )
        except NotFound:
            return None
        return _budget(response.budget)

    async def reserve(
        self, session_id: str, items: Sequence[tuple[str, Decimal, str]], ttl_seconds: float
    ) -> Reserved:
        """Reserves (key, amount, document id) items; a document's charges count against its
        reservation."""
        request = cost_service_pb2.ReserveBudgetRequest(
            session_id=session_id,
            items=[
                cost_service_pb2.ReservationItem(
                    key=k, amount=convert.money(a), document_id=document_id
                )
                for k, a, document_id in items
            ],
            ttl=convert.duration(ttl_seconds),
            allow_partial=True,
        )
        try:
            response = await self._stub.ReserveBudget(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise BudgetRefused(exc.details() or "budget exhausted") from None
            raise peer_error(exc, COST_SERVICE, resource="budget", name=session_id) from None
        return Reserved(
            granted=[(r.reservation_id, _money(r.amount)) for r in response.reservations],
            exhausted=response.exhausted,
            budget=_budget(response.budget) if response.HasField("budget") else None,
        )

    async def release(self, reservation_ids: Sequence[str]) -> None:
        await _ask(
            self._stub.ReleaseReservation,
            cost_service_pb2.ReleaseReservationRequest(reservation_ids=list(reservation_ids)),
            self._timeout,
            COST_SERVICE,
        )

    async def settle(self, settlements: Sequence[tuple[str, Decimal]]) -> None:
        await _ask(
            self._stub.SettleReservation,
            cost_service_pb2.SettleReservationRequest(
                settlements=[
                    cost_service_pb2.Settlement(reservation_id=rid, actual=convert.money(amount))
                    for rid, amount in settlements
                ]
            ),
            self._timeout,
            COST_SERVICE,
        )

    async def session_costs(self, session_id: str) -> SessionCosts:
        """The session's ledger totals (totals only: GetSession asks every second)."""
        response = await _ask(
            self._stub.GetSessionCosts,
            cost_service_pb2.GetSessionCostsRequest(session_id=session_id, totals_only=True),
            self._timeout,
            COST_SERVICE,
        )
        return SessionCosts(
            _money(response.actual_total), _money(response.estimate_total), response.event_count
        )

    async def actual_events(self, session_id: str, page_size: int = 1000) -> CostEventIndex:
        index = CostEventIndex()
        token = ""
        while True:
            response = await _ask(
                self._stub.ListCostEvents,
                cost_service_pb2.ListCostEventsRequest(
                    session_id=session_id,
                    kind=cost_service_pb2.COST_KIND_ACTUAL,
                    page_size=page_size,
                    page_token=token,
                ),
                self._timeout,
                COST_SERVICE,
            )
            for e in response.events:
                key = (e.document_id, convert.stage_name(e.stage), e.attempt)
                amount = _money(e.amount)
                index.runs[key] = index.runs.get(key, 0) + 1
                index.amounts[key] = index.amounts.get(key, ZERO) + amount
                index.total += amount
            token = response.next_page_token
            if not token:
                return index

    async def estimate_files(self, files: Sequence[FilePlanItem]) -> dict[str, Decimal]:
        """The estimated cost of processing each file by its plan, by key."""
        if not files:
            return {}
        response = await _ask(
            self._stub.EstimateCost,
            cost_service_pb2.EstimateCostRequest(
                files=[
                    cost_service_pb2.FilePlan(
                        key=f.key,
                        plan=convert.plan_value(f.plan),
                        page_count=f.page_count,
                        ocr_page_count=f.ocr_page_count,
                        size_bytes=f.size_bytes,
                    )
                    for f in files
                ]
            ),
            self._timeout,
            COST_SERVICE,
        )
        return {estimate.key: _money(estimate.amount) for estimate in response.files}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
