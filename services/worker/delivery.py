"""Delivering finished runs: making their artifacts durable, charging them, reporting them.

Owns `Delivery` (one finished run: its result, still without its cost, and
its cost events) and `Deliverer`, which delivers several at once from the
outbox's thread (services/worker/outbox.py) or one from its own task: one
`sync()` of the artifact store for the runs whose artifacts were written
but not yet made durable, one RecordCosts for the runs not yet charged,
then one ReportStageResults. What it returns are the runs to try again.

Which answers end a run's delivery: the session service's answer for it,
OK or a refusal that no retry can change (`FINAL`: the run is no longer
wanted, not found, malformed); anything else (a service unreachable or
restarting, its database down, a deadline) is tried again. The cost
events of a run are recorded once (`charge` keeps the ledger's total for
the retries); a ledger that refuses them for good (an unpriced operation:
the rest are recorded; a bad token) leaves the run reported without a cost,
which the session's verification shows. A failed sync turns the runs
whose artifacts it was to make durable into retryable `io_error` failures.

Traced as a part of the runs' own traces: one run's delivery in its
context (its calls are children of its task's span), several in a span of
their own linked to each run's.
"""

from __future__ import annotations

import contextvars
import decimal
import logging
import re
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import grpc
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2
from docimport.session.v1 import session_service_pb2
from opentelemetry import trace

from services.common import convert
from services.common.errors import status_code
from services.common.logging import bind
from services.worker.artifacts import ArtifactStore
from services.worker.journal import Entry
from services.worker.reporting import Reporter

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

# Answers that end a run's delivery: no retry can change them.
FINAL = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
REFUSED = "refused"  # `charge` of a run whose cost events the ledger refused for good


@dataclass(eq=False)
class Delivery:
    """One finished run on its way to the services."""

    task_id: str
    session_id: str
    document_id: str
    stage: str
    result: session_service_pb2.ReportStageResultRequest  # its cost is set when charged
    costs: list[cost_service_pb2.CostEvent]
    needs_sync: bool = False
    traceparent: str | None = None
    # None: not charged yet; REFUSED; else the ledger's total, "amount currency".
    charge: str | None = None
    created: float = field(default_factory=time.time)
    # The run's context (log fields, trace), in the process that ran it; None once adopted.
    context: contextvars.Context | None = None
    tries: int = 0
    due: float = 0.0  # monotonic time of the next attempt

    def entry(self) -> Entry:
        return Entry(
            self.task_id, self.session_id, self.document_id, self.stage,
            self.result.SerializeToString(),
            cost_service_pb2.RecordCostsRequest(events=self.costs).SerializeToString(),
            self.charge, self.needs_sync, self.traceparent, self.created,
        )

    @classmethod
    def of(cls, entry: Entry) -> Delivery:
        result = session_service_pb2.ReportStageResultRequest.FromString(entry.result)
        costs = cost_service_pb2.RecordCostsRequest.FromString(entry.costs).events
        return cls(
            entry.task_id, entry.session_id, entry.document_id, entry.stage, result, list(costs),
            entry.needs_sync, entry.traceparent, entry.charge, entry.created,
        )

    def request(self) -> session_service_pb2.ReportStageResultRequest:
        """The result to report, with the run's cost once it is charged."""
        request = session_service_pb2.ReportStageResultRequest()
        request.CopyFrom(self.result)
        if self.charge and self.charge != REFUSED:
            amount, _, currency = self.charge.partition(" ")
            request.cost.CopyFrom(common_pb2.Money(amount=amount, currency_code=currency))
        return request

    def fail_io(self, exc: BaseException) -> None:
        """Its artifact may not be on disk: it becomes a retryable failure."""
        self.result.succeeded = False
        del self.result.artifacts[:]
        self.result.error_class = session_service_pb2.ERROR_CLASS_RETRYABLE
        self.result.error_code = "io_error"
        self.result.error_message = f"{type(exc).__name__}: {exc}"[:2000]

    def run(self, fn: Any, *args: Any) -> Any:
        """Calls `fn` in the run's own context, or with its ids bound once adopted."""
        if self.context is not None:
            return self.context.copy().run(fn, *args)
        with bind(session_id=self.session_id, document_id=self.document_id):
            return fn(*args)


class Deliverer:
    """Delivers finished runs; returns those to try again."""

    def __init__(self, store: ArtifactStore, reporter: Reporter) -> None:
        self.store = store
        self.reporter = reporter

    def deliver(self, batch: list[Delivery]) -> list[Delivery]:
        if len(batch) == 1:
            return batch[0].run(self._deliver_together, batch)
        links = [
            trace.Link(ctx)
            for ctx in (
                d.run(lambda: trace.get_current_span().get_span_context()) for d in batch
            )
            if ctx.is_valid
        ]
        with _tracer.start_as_current_span(
            "deliver stage runs", links=links, attributes={"docimport.runs": len(batch)}
        ):
            return self._deliver_together(batch)

    def _deliver_together(self, batch: list[Delivery]) -> list[Delivery]:
        self._sync(batch)
        try:
            self._charge(batch)
        except grpc.RpcError as exc:
            logger.warning("could not charge %d finished runs (%s: %s); will try again",
                           len(batch), exc.code(), exc.details())
            return batch
        try:
            answers = self.reporter.stage_results([d.request() for d in batch])
        except grpc.RpcError as exc:
            logger.warning("could not report %d finished runs (%s: %s); will try again",
                           len(batch), exc.code(), exc.details())
            return batch
        retry = []
        for d, answer in zip(batch, answers, strict=True):
            if not answer.code:
                continue
            code = status_code(answer.code)
            if code in FINAL:
                d.run(logger.warning, "session service refused the result: %s: %s",
                      code.name, answer.message)
            else:
                retry.append(d)
        return retry

    def _sync(self, batch: list[Delivery]) -> None:
        pending = [d for d in batch if d.needs_sync]
        if not pending:
            return
        try:
            self.store.sync(everything=any(d.context is None for d in pending))
        except OSError as exc:  # the artifacts may not be on disk: none of them is reported
            for d in pending:
                if d.result.succeeded:
                    d.run(logger.warning, "artifact not made durable: %s", exc)
                    d.fail_io(exc)
        for d in pending:
            d.needs_sync = False

    def _charge(self, batch: list[Delivery]) -> None:
        """Records the cost events of the runs not charged yet (TRANSIENT and other retryable
        errors raise; a refusal for good marks the run REFUSED)."""
        due = [d for d in batch if d.charge is None]
        totals = self._record_runs([d.costs for d in due])
        for d, total in zip(due, totals, strict=True):
            d.charge = REFUSED if total is None else f"{total.amount} {total.currency_code}"

    def _record_runs(
        self, runs: list[list[cost_service_pb2.CostEvent]]
    ) -> list[common_pb2.Money | None]:
        """Each run's RecordCosts total, from one call for all their events when the ledger takes
        them; when it refuses some, one call per run (so one run's refusal costs no other its
        charge). A run without events is charged nothing."""
        charged = [i for i, events in enumerate(runs) if events]
        totals: list[common_pb2.Money | None] = [convert.money(0)] * len(runs)
        if len(charged) == 1:
            totals[charged[0]] = self._record(runs[charged[0]])
        if len(charged) <= 1:
            return totals
        try:
            response = self.reporter.record_costs(
                cost_service_pb2.RecordCostsRequest(events=[e for i in charged for e in runs[i]])
            )
        except grpc.RpcError as exc:
            if exc.code() not in FINAL:
                raise
            for i in charged:
                totals[i] = self._record(runs[i])
            return totals
        first = 0
        with decimal.localcontext(prec=60):  # exact sums of ledger amounts (16 places)
            for i in charged:
                recorded = response.events[first : first + len(runs[i])]
                first += len(runs[i])
                totals[i] = convert.money(
                    sum((Decimal(e.amount.amount or "0") for e in recorded), Decimal(0)),
                    response.total.currency_code or convert.CURRENCY,
                )
        return totals

    def _record(self, events: list[cost_service_pb2.CostEvent]) -> common_pb2.Money | None:
        """The total RecordCosts charged, or None when the ledger refused the events for good."""
        try:
            return self.reporter.record_costs(
                cost_service_pb2.RecordCostsRequest(events=events)
            ).total
        except grpc.RpcError as exc:
            if exc.code() not in FINAL:
                raise
            unpriced = _unpriced(exc) if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else set()
            kept = [e for i, e in enumerate(events) if i not in unpriced]
            if not unpriced or not kept:
                # A refusal no retry can fix (a malformed event, a run not dispatched): report
                # the stage anyway; the session's verification flags the missing costs.
                logger.error(
                    "cost service refused the run's cost events: %s: %s", exc.code(), exc.details()
                )
                return None
            logger.warning(
                "the price book has no price for %s; recording the other events",
                ", ".join(sorted({f"{events[i].service}/{events[i].operation}" for i in unpriced})),
            )
        try:
            return self.reporter.record_costs(cost_service_pb2.RecordCostsRequest(events=kept)).total
        except grpc.RpcError as exc:
            if exc.code() not in FINAL:
                raise
            logger.error(
                "cost service refused the run's cost events: %s: %s", exc.code(), exc.details()
            )
            return None


_UNPRICED_FIELD = re.compile(r"^events\[(\d+)\]\.operation$")


def _unpriced(error: grpc.RpcError) -> set[int]:
    """Indexes of the events an INVALID_ARGUMENT says have no price (from its BadRequest)."""
    from google.rpc import error_details_pb2

    from services.common.errors import details_of

    try:
        requests = details_of(error, error_details_pb2.BadRequest)
    except (AttributeError, TypeError, ValueError):  # an error without status details
        return set()
    found = set()
    for request in requests:
        for violation in request.field_violations:
            match = _UNPRICED_FIELD.match(violation.field)
            if match and "no price" in violation.description:
                found.add(int(match.group(1)))
    return found

