"""The worker's calls to the session and cost services (blocking gRPC stubs).

Owns the worker's two channels - to `DOCIMPORT_SESSION_ADDR` and
`DOCIMPORT_COST_ADDR`, opened on first use in the process that uses them
(never in a prefork parent: gRPC channels do not survive fork) and closed
by `close()` - and the retry rule of a report: a call answered UNAVAILABLE
or DEADLINE_EXCEEDED is tried again with exponential backoff
(`report_attempts`, `report_backoff`), on top of the channel's own
transparent retries; after that the error propagates and the task fails,
leaving the run to the session service's lease and reconciler. Every call
here is idempotent on the server (a stage run's reports by document, stage
and attempt; cost events by their ledger key), so a retry never counts twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from docimport.cost.v1 import cost_service_pb2, cost_service_pb2_grpc
from docimport.session.v1 import session_service_pb2, session_service_pb2_grpc

from services.common.channels import sync_channel
from services.worker.config import WorkerSettings

logger = logging.getLogger(__name__)

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class Reporter:
    """Blocking calls to SessionService and CostService with in-process retries."""

    def __init__(
        self, settings: WorkerSettings, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.settings = settings
        self._sleep = sleep
        self._lock = threading.Lock()
        self._channels: list[grpc.Channel] = []
        self._session: session_service_pb2_grpc.SessionServiceStub | None = None
        self._cost: cost_service_pb2_grpc.CostServiceStub | None = None

    def _stubs(
        self,
    ) -> tuple[session_service_pb2_grpc.SessionServiceStub, cost_service_pb2_grpc.CostServiceStub]:
        with self._lock:
            if self._session is None or self._cost is None:
                session_channel = sync_channel(self.settings.session_addr, self.settings)
                cost_channel = sync_channel(self.settings.cost_addr, self.settings)
                self._channels = [session_channel, cost_channel]
                self._session = session_service_pb2_grpc.SessionServiceStub(session_channel)
                self._cost = cost_service_pb2_grpc.CostServiceStub(cost_channel)
            return self._session, self._cost

    def _call(self, what: str, method: Callable[..., Any], request: Any) -> Any:
        attempts = max(1, self.settings.report_attempts)
        for attempt in range(1, attempts + 1):
            try:
                return method(request, timeout=self.settings.rpc_timeout)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code not in TRANSIENT or attempt == attempts:
                    raise
                delay = self.settings.report_backoff * 2 ** (attempt - 1)
                logger.warning(
                    "%s: %s, trying again in %.1f s (%d/%d)", what, code, delay, attempt, attempts
                )
                self._sleep(delay)
        raise AssertionError("unreachable")

    def stage_started(
        self, request: session_service_pb2.ReportStageStartedRequest
    ) -> session_service_pb2.ReportStageStartedResponse:
        session, _ = self._stubs()
        return self._call("ReportStageStarted", session.ReportStageStarted, request)

    def record_costs(
        self, request: cost_service_pb2.RecordCostsRequest
    ) -> cost_service_pb2.RecordCostsResponse:
        _, cost = self._stubs()
        return self._call("RecordCosts", cost.RecordCosts, request)

    def stage_result(
        self, request: session_service_pb2.ReportStageResultRequest
    ) -> session_service_pb2.ReportStageResultResponse:
        session, _ = self._stubs()
        return self._call("ReportStageResult", session.ReportStageResult, request)

    def stage_results(
        self, requests: list[session_service_pb2.ReportStageResultRequest]
    ) -> list[session_service_pb2.StageResultAnswer]:
        """Several runs' results in one ReportStageResults call, retried as one; an answer per
        run, in request order (a refusal of one run is in its answer, code non-zero)."""
        session, _ = self._stubs()
        response = self._call(
            "ReportStageResults",
            session.ReportStageResults,
            session_service_pb2.ReportStageResultsRequest(reports=requests),
        )
        return list(response.answers)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels:
                channel.close()
            self._channels = []
            self._session = self._cost = None
