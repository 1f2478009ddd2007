"""The run protocol (started -> cache -> stage -> costs -> result) with a recording reporter.

`RecordingReporter` stands in for `services.worker.reporting.Reporter` (our
own class, not a third-party mock); the real gRPC path is covered by
test_worker_integration.py.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2
from docimport.session.v1 import session_service_pb2

from services.common.artifacts import path_of, verify_artifact
from services.worker.artifacts import LocalArtifactStore, S3ArtifactStore
from services.worker.config import WorkerSettings
from services.worker.processors.extract import Extractor
from services.worker.reporting import Reporter
from services.worker.runner import StageRunner
from services.worker.stages import (
    ChunkStage,
    EntitiesStage,
    ExtractStage,
    Prepared,
    StageOutput,
)

from .helpers import payload

RATE = Decimal("0.00001389")


class FakeRpcError(grpc.RpcError):
    """An error as a gRPC call raises it, optionally with google.rpc details."""

    def __init__(self, code: grpc.StatusCode, details: str = "", *extra: Any) -> None:
        super().__init__(details)
        self._code, self._details, self._extra = code, details, extra

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        if not self._extra:
            return ()
        from google.protobuf import any_pb2
        from google.rpc import status_pb2

        packed = []
        for message in self._extra:
            item = any_pb2.Any()
            item.Pack(message)
            packed.append(item)
        status = status_pb2.Status(code=self._code.value[0], message=self._details, details=packed)
        return (("grpc-status-details-bin", status.SerializeToString()),)


class RecordingReporter:
    def __init__(self) -> None:
        self.started: list[session_service_pb2.ReportStageStartedRequest] = []
        self.costs: list[cost_service_pb2.RecordCostsRequest] = []
        self.results: list[session_service_pb2.ReportStageResultRequest] = []
        self.proceed = True
        self.cost_error: grpc.StatusCode | None = None
        self.unpriced: set[tuple[str, str]] = set()
        self.result_error: grpc.StatusCode | None = None
        self.result_calls: list[int] = []  # reports per ReportStageResults call
        self.unknown: set[str] = set()  # documents whose results it answers NOT_FOUND

    def stage_started(self, request: Any) -> session_service_pb2.ReportStageStartedResponse:
        self.started.append(request)
        return session_service_pb2.ReportStageStartedResponse(proceed=self.proceed)

    def record_costs(self, request: Any) -> cost_service_pb2.RecordCostsResponse:
        self.costs.append(request)
        if self.cost_error is not None:
            raise FakeRpcError(self.cost_error, "refused")
        unpriced = [
            i for i, e in enumerate(request.events) if (e.service, e.operation) in self.unpriced
        ]
        if unpriced:
            from google.rpc import error_details_pb2

            violations = [
                error_details_pb2.BadRequest.FieldViolation(
                    field=f"events[{i}].operation",
                    description="price book version 1 has no price for it",
                )
                for i in unpriced
            ]
            raise FakeRpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid",
                error_details_pb2.BadRequest(field_violations=violations),
            )
        recorded = []
        for e in request.events:
            amount = (
                Decimal(e.units) * RATE
                if e.operation == "compute_second" and not e.cache_hit
                else Decimal(0)
            )
            recorded.append(cost_service_pb2.CostEvent(
                document_id=e.document_id,
                operation=e.operation,
                amount=common_pb2.Money(currency_code="USD", amount=str(amount)),
            ))
        total = sum((Decimal(e.amount.amount) for e in recorded), Decimal(0))
        return cost_service_pb2.RecordCostsResponse(
            events=recorded, total=common_pb2.Money(currency_code="USD", amount=str(total))
        )

    def stage_result(self, request: Any) -> session_service_pb2.ReportStageResultResponse:
        if self.result_error is not None:
            raise FakeRpcError(self.result_error, "down")
        self.results.append(request)
        return session_service_pb2.ReportStageResultResponse()

    def stage_results(self, requests: list[Any]) -> list[session_service_pb2.StageResultAnswer]:
        if self.result_error is not None:
            raise FakeRpcError(self.result_error, "down")
        self.result_calls.append(len(requests))
        self.results.extend(requests)
        return [
            session_service_pb2.StageResultAnswer(
                code=grpc.StatusCode.NOT_FOUND.value[0] if r.document_id in self.unknown else 0
            )
            for r in requests
        ]


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def reporter() -> RecordingReporter:
    return RecordingReporter()


@pytest.fixture
def runner(store: LocalArtifactStore, reporter: RecordingReporter) -> StageRunner:
    extractor = Extractor(None)
    stages = {
        "extract": ExtractStage(extractor),
        "chunk": ChunkStage(store, extractor, size=800, overlap=100),
        "entities": EntitiesStage(store, extractor),
    }
    return StageRunner(stages=stages, store=store, reporter=reporter)  # type: ignore[arg-type]


def run(runner: StageRunner, p: Any, stage: str | None = None) -> dict[str, Any]:
    return runner.run(
        p.to_json(),
        task_id=f"task-{p.document_id}-{p.stage}",
        worker="test:1",
        stage=stage or p.stage,
    )


def test_extract_reports_start_costs_and_result(
    runner: StageRunner, reporter: RecordingReporter
) -> None:
    p = payload("pleadings/complaint.pdf")
    summary = run(runner, p)
    assert summary["succeeded"] and not summary["cache_hit"]
    (started,) = reporter.started
    assert (started.document_id, started.stage, started.attempt, started.worker) == (
        p.document_id,
        common_pb2.STAGE_EXTRACT,
        1,
        "test:1",
    )
    (costs,) = reporter.costs
    (compute,) = costs.events
    assert (compute.service, compute.operation, compute.kind, compute.cache_hit) == (
        "local",
        "compute_second",
        cost_service_pb2.COST_KIND_ACTUAL,
        False,
    )
    assert (compute.session_id, compute.document_id, compute.attempt, compute.category) == (
        p.session_id,
        p.document_id,
        1,
        "pleadings",
    )
    assert Decimal(compute.units) > 0
    (result,) = reporter.results
    assert result.succeeded and result.error_class == session_service_pb2.ERROR_CLASS_UNSPECIFIED
    assert (
        result.stats.pages == 3 and result.stats.characters > 3000 and result.stats.ocr_pages == 0
    )
    assert result.cost.amount == str(Decimal(compute.units) * RATE)
    assert result.duration.ToNanoseconds() > 0
    (artifact,) = result.artifacts
    assert artifact.kind == "text" and artifact.uri.startswith("file://")
    assert verify_artifact(artifact.uri, artifact.sha256, artifact.size_bytes, deep=True).ok
    body = json.loads(path_of(artifact.uri).read_bytes())
    assert body["source_sha256"] == p.sha256 and body["stage"] == "extract"
    assert body["usage"]["compute_seconds"] and "Case No. 2:24-cv-01234" in body["text"]


def test_identical_file_in_another_session_is_a_free_cache_hit(
    runner: StageRunner, reporter: RecordingReporter
) -> None:
    first = payload("medical_records/er_visit_summary.pdf")
    run(runner, first)
    copy = payload("medical_records/er_visit_summary_copy.pdf")
    assert copy.sha256 == first.sha256 and copy.session_id != first.session_id
    summary = run(runner, copy)
    assert summary["cache_hit"] and summary["succeeded"]
    original, hit = reporter.costs
    (saved,) = hit.events
    assert saved.cache_hit and saved.operation == "compute_second"
    # The units of what the work took the first time, so the cost service can compute `saved`.
    stored = json.loads(path_of(reporter.results[0].artifacts[0].uri).read_bytes())["usage"][
        "compute_seconds"
    ]
    assert Decimal(saved.units) == Decimal(stored)
    first_result, hit_result = reporter.results
    assert hit_result.cache_hit and hit_result.cost.amount == "0"
    assert hit_result.artifacts == first_result.artifacts
    assert hit_result.stats == first_result.stats


def test_a_damaged_cached_artifact_is_redone_and_replaced(
    runner: StageRunner, reporter: RecordingReporter
) -> None:
    first = payload("correspondence/call_notes.txt")
    run(runner, first)
    damaged = path_of(reporter.results[0].artifacts[0].uri)
    damaged.write_bytes(b'{"text": "trunc')
    summary = run(runner, payload("correspondence/call_notes.txt"))
    assert summary["succeeded"] and not summary["cache_hit"]
    redone = reporter.results[1].artifacts[0]
    assert path_of(redone.uri) == damaged
    assert verify_artifact(redone.uri, redone.sha256, redone.size_bytes, deep=True).ok
    assert "café" in json.loads(damaged.read_bytes())["text"]


@pytest.mark.parametrize(
    ("relative", "code"),
    [
        ("medical_records/corrupt_scan.pdf", "corrupt"),
        ("medical_records/sealed_records.pdf", "encrypted"),
    ],
)
def test_permanent_failures_are_reported_as_such(
    runner: StageRunner, reporter: RecordingReporter, relative: str, code: str
) -> None:
    summary = run(runner, payload(relative))
    assert not summary["succeeded"] and summary["error_code"] == code
    (result,) = reporter.results
    assert not result.succeeded and not result.artifacts
    assert (result.error_class, result.error_code) == (
        session_service_pb2.ERROR_CLASS_PERMANENT,
        code,
    )
    assert result.error_message
    (costs,) = reporter.costs
    assert [e.operation for e in costs.events] == ["compute_second"]  # the attempt still cost CPU


def test_a_changed_source_is_permanent(
    runner: StageRunner, reporter: RecordingReporter, case_copy: Path
) -> None:
    p = payload("pleadings/answer.pdf", root=case_copy)
    (case_copy / "pleadings/answer.pdf").write_bytes(b"%PDF-1.7 replaced")
    run(runner, p)
    assert reporter.results[0].error_code == "source_changed"


def test_proceed_false_does_nothing(
    runner: StageRunner, reporter: RecordingReporter, store: LocalArtifactStore
) -> None:
    reporter.proceed = False
    summary = run(runner, payload("pleadings/complaint.pdf"))
    assert summary["proceed"] is False
    assert len(reporter.started) == 1 and not reporter.costs and not reporter.results
    assert not store.root.exists()


def _unasked_for(seconds: float) -> str:
    """The payload's `start_unasked_until`: when the run's first lease ends."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


class SlowStage:
    """An extract stage that works `seconds` (checking its deadline) and notes what it saw."""

    name = "extract"
    processor = "slow"

    def __init__(self, seconds: float, reporter: RecordingReporter) -> None:
        self.seconds, self.reporter = seconds, reporter
        self.start_reported_while_working = False

    def prepare(self, payload: Any) -> Prepared:
        return Prepared("slow-1")

    def run(self, payload: Any, prepared: Any, usage: Any, deadline: Any) -> StageOutput:
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            deadline.check()
            time.sleep(0.01)
        self.start_reported_while_working = bool(self.reporter.started)
        return StageOutput(body={"text": ""}, stats={"characters": 0})


def test_a_short_run_reports_only_its_result(
    runner: StageRunner, reporter: RecordingReporter
) -> None:
    runner.started_after = 1.0
    p = payload("pleadings/complaint.pdf", start_unasked_until=_unasked_for(45))
    summary = runner.run(p.to_json(), task_id="t1", worker="test:1", stage="extract")
    assert summary["succeeded"]
    assert reporter.started == []
    (costs,) = reporter.costs
    (result,) = reporter.results
    assert result.succeeded and result.artifacts and result.duration.ToNanoseconds() > 0
    assert [e.operation for e in costs.events] == ["compute_second"]


@pytest.mark.parametrize("until", ["", "not a time", "near", "redelivered"])
def test_a_run_asks_before_working_when_it_may_have_been_superseded(
    runner: StageRunner, reporter: RecordingReporter, until: str
) -> None:
    """Its first lease near its end (a message that waited long), unknown, or its message
    back from a worker that died holding it: its run may be expired and run again."""
    runner.started_after = 1.0
    when = {"near": _unasked_for(5), "redelivered": _unasked_for(45)}.get(until, until)
    p = payload("pleadings/complaint.pdf", start_unasked_until=when)
    runner.run(
        p.to_json(), task_id="t1", worker="test:1", stage="extract",
        redelivered=until == "redelivered",
    )
    (started,) = reporter.started
    assert not started.HasField("started_at")
    assert len(reporter.results) == 1


def test_a_run_that_lasts_reports_its_start_while_it_works(
    store: LocalArtifactStore, reporter: RecordingReporter
) -> None:
    slow = SlowStage(0.5, reporter)
    runner = StageRunner(
        stages={"extract": slow},  # type: ignore[dict-item]
        store=store,
        reporter=reporter,  # type: ignore[arg-type]
        started_after=0.1,
    )
    p = payload("pleadings/complaint.pdf", start_unasked_until=_unasked_for(45))
    began = dt.datetime.now(dt.UTC)
    summary = runner.run(p.to_json(), task_id="t1", worker="test:1", stage="extract")
    assert summary["succeeded"], summary
    assert slow.start_reported_while_working
    (started,) = reporter.started
    assert (started.document_id, started.task_id, started.worker) == (p.document_id, "t1", "test:1")
    assert abs(started.started_at.ToDatetime(dt.UTC) - began) < dt.timedelta(seconds=0.1)
    assert len(reporter.costs) == 1 and reporter.results[0].succeeded


def test_a_run_refused_while_it_works_stops_and_is_charged_as_not_wanted(
    store: LocalArtifactStore, reporter: RecordingReporter
) -> None:
    reporter.proceed = False  # the session was cancelled meanwhile
    runner = StageRunner(
        stages={"extract": SlowStage(20.0, reporter)},  # type: ignore[dict-item]
        store=store,
        reporter=reporter,  # type: ignore[arg-type]
        started_after=0.1,
    )
    p = payload("pleadings/complaint.pdf", start_unasked_until=_unasked_for(45))
    clock = time.monotonic()
    summary = runner.run(p.to_json(), task_id="t1", worker="test:1", stage="extract")
    assert time.monotonic() - clock < 5, "the run did not stop when it was refused"
    assert summary["proceed"] is False
    assert len(reporter.started) == 1
    (costs,) = reporter.costs  # the work it did is charged
    assert [e.operation for e in costs.events] == ["compute_second"]
    # and reported with its cost, so that the session's totals hold it (the service refuses it)
    (result,) = reporter.results
    assert not result.succeeded and result.error_code == "not_wanted"
    assert Decimal(result.cost.amount) > 0
    assert not store.root.exists()  # and nothing stored


def test_chunk_before_extract_is_retryable_then_chunk_and_entities_follow(
    runner: StageRunner, reporter: RecordingReporter
) -> None:
    extract = payload("pleadings/complaint.pdf")
    chunk = payload(
        "pleadings/complaint.pdf",
        "chunk",
        session_id=extract.session_id,
        document_id=extract.document_id,
    )
    run(runner, chunk)
    early = reporter.results[-1]
    assert (early.error_class, early.error_code) == (
        session_service_pb2.ERROR_CLASS_RETRYABLE,
        "input_missing",
    )

    run(runner, extract)
    run(
        runner,
        payload(
            "pleadings/complaint.pdf",
            "chunk",
            session_id=extract.session_id,
            document_id=extract.document_id,
            attempt=2,
        ),
    )
    chunked = reporter.results[-1]
    assert chunked.succeeded and chunked.stats.chunks >= 5 and chunked.artifacts[0].kind == "chunks"
    entities = payload(
        "pleadings/complaint.pdf",
        "entities",
        session_id=extract.session_id,
        document_id=extract.document_id,
    )
    run(runner, entities)
    found = reporter.results[-1]
    assert found.succeeded and found.stats.entities >= 10 and found.artifacts[0].kind == "entities"
    body = json.loads(path_of(found.artifacts[0].uri).read_bytes())
    extract_ref = reporter.results[1].artifacts[0]
    assert body["input"]["sha256"] == extract_ref.sha256
    assert body["counts"]["case_number"] == 1
    assert any(e["text"] == "$250,000.00" for e in body["entities"])


def test_a_task_of_the_wrong_stage_is_a_bad_payload(
    runner: StageRunner, reporter: RecordingReporter
) -> None:
    run(runner, payload("pleadings/complaint.pdf"), stage="chunk")
    assert (reporter.results[0].error_class, reporter.results[0].error_code) == (
        session_service_pb2.ERROR_CLASS_PERMANENT,
        "bad_payload",
    )


def test_a_malformed_payload_is_dropped_without_reports(
    runner: StageRunner, reporter: RecordingReporter
) -> None:
    summary = runner.run({"document_id": "x"}, task_id="t", worker="w", stage="extract")
    assert summary["error_code"] == "bad_payload" and not reporter.started


def test_cost_refusal_still_reports_the_result_without_cost(
    runner: StageRunner, reporter: RecordingReporter
) -> None:
    reporter.cost_error = grpc.StatusCode.INVALID_ARGUMENT
    run(runner, payload("correspondence/call_notes.txt"))
    (result,) = reporter.results
    assert result.succeeded and not result.HasField("cost")


def test_events_the_price_book_does_not_price_are_dropped_not_the_rest(
    runner: StageRunner, reporter: RecordingReporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner.store, "take_requests", lambda: {("s3", "get_request"): 2})
    reporter.unpriced = {("s3", "get_request")}
    run(runner, payload("correspondence/call_notes.txt"))
    refused, recorded = reporter.costs
    assert [e.operation for e in refused.events] == ["compute_second", "get_request"]
    assert [e.operation for e in recorded.events] == ["compute_second"]
    (result,) = reporter.results
    assert result.succeeded and result.HasField("cost")


def test_a_local_artifact_is_made_durable_before_its_result_is_reported(
    background: StageRunner,
    store: LocalArtifactStore,
    reporter: RecordingReporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The task writes the artifact without its fsyncs; the delivery thread syncs the store
    before it reports the run (a result never names an artifact that could still be lost)."""
    order: list[str] = []
    sync, results = store.sync, reporter.stage_results
    monkeypatch.setattr(store, "sync", lambda **kw: (order.append("sync"), sync(**kw))[1])
    monkeypatch.setattr(
        reporter, "stage_results", lambda requests: (order.append("report"), results(requests))[1]
    )
    summary = run(background, payload("correspondence/call_notes.txt"))
    assert summary["succeeded"] and summary["delivery"] == "queued"
    assert background.drain(10)
    assert order == ["sync", "report"]
    (result,) = reporter.results
    assert result.HasField("cost") and Decimal(result.cost.amount) > 0
    (artifact,) = result.artifacts
    assert verify_artifact(artifact.uri, artifact.sha256, artifact.size_bytes, deep=True).ok


def test_a_failed_put_is_a_retryable_io_error_and_its_costs_are_recorded(
    runner: StageRunner,
    store: LocalArtifactStore,
    reporter: RecordingReporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "put", full_disk)
    summary = run(runner, payload("correspondence/call_notes.txt"))
    assert not summary["succeeded"] and summary["error_code"] == "io_error"
    (costs,) = reporter.costs
    assert [e.operation for e in costs.events] == ["compute_second"]
    (result,) = reporter.results
    assert not result.succeeded and not result.artifacts and result.HasField("cost")
    assert (result.error_class, result.error_code) == (
        session_service_pb2.ERROR_CLASS_RETRYABLE,
        "io_error",
    )
    assert "No space left on device" in result.error_message


@pytest.fixture
def s3_runner(s3: Any, reporter: RecordingReporter) -> StageRunner:
    """An extract-only runner on an S3 store (moto)."""
    return StageRunner(
        stages={"extract": ExtractStage(Extractor(None))},
        store=S3ArtifactStore("s3://docimport-artifacts/runs", client=s3),
        reporter=reporter,  # type: ignore[arg-type]
    )


def test_an_s3_artifact_is_stored_before_the_costs_so_that_its_put_is_billed(
    s3_runner: StageRunner, reporter: RecordingReporter
) -> None:
    assert run(s3_runner, payload("correspondence/call_notes.txt"))["succeeded"]
    (costs,) = reporter.costs
    assert [(e.service, e.operation, e.units) for e in costs.events] == [
        ("local", "compute_second", costs.events[0].units),
        ("s3", "get_request", "1"),
        ("s3", "put_request", "1"),
    ]
    (result,) = reporter.results
    (artifact,) = result.artifacts
    assert artifact.uri.startswith("s3://docimport-artifacts/runs/")


def test_a_failed_s3_put_is_tried_once_and_reported_with_its_billed_requests(
    s3_runner: StageRunner, reporter: RecordingReporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = s3_runner.store
    puts = []

    def refused_put(*args: Any, **kwargs: Any) -> Any:
        puts.append(args)
        store._count("put_request")  # type: ignore[attr-defined]
        raise OSError(5, "connection reset by the object store")

    monkeypatch.setattr(store, "put", refused_put)
    summary = run(s3_runner, payload("correspondence/call_notes.txt"))
    assert not summary["succeeded"] and summary["error_code"] == "io_error"
    assert len(puts) == 1
    (costs,) = reporter.costs
    assert [(e.operation, e.units) for e in costs.events[1:]] == [
        ("get_request", "1"),
        ("put_request", "1"),
    ]
    (result,) = reporter.results
    assert not result.succeeded and not result.artifacts


def test_cost_service_down_fails_a_task_that_delivers_its_own_run(
    runner: StageRunner, reporter: RecordingReporter
) -> None:
    reporter.cost_error = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(RuntimeError, match="could not deliver"):
        run(runner, payload("correspondence/call_notes.txt"))
    assert not reporter.results


def test_session_service_down_fails_a_task_that_delivers_its_own_run(
    runner: StageRunner, reporter: RecordingReporter
) -> None:
    reporter.result_error = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(RuntimeError, match="could not deliver"):
        run(runner, payload("correspondence/call_notes.txt"))
    reporter.result_error = None
    superseded = payload("correspondence/call_notes.txt")
    reporter.unknown = {superseded.document_id}  # the service answers for it: refused for good
    assert run(runner, superseded)["succeeded"]


def test_reporter_retries_unavailable_with_backoff_then_gives_up() -> None:
    settings = WorkerSettings(broker_url="memory://", report_attempts=3, report_backoff=0.5)
    sleeps: list[float] = []
    reporter = Reporter(settings, sleep=sleeps.append)
    calls: list[float | None] = []

    def flaky(request: Any, timeout: float | None = None) -> str:
        calls.append(timeout)
        if len(calls) < 3:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
        return "ok"

    assert reporter._call("test", flaky, None) == "ok"
    assert sleeps == [0.5, 1.0] and calls == [settings.rpc_timeout] * 3

    def down(request: Any, timeout: float | None = None) -> str:
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(grpc.RpcError):
        reporter._call("test", down, None)

    def denied(request: Any, timeout: float | None = None) -> str:
        raise FakeRpcError(grpc.StatusCode.PERMISSION_DENIED)

    sleeps.clear()
    with pytest.raises(grpc.RpcError):
        reporter._call("test", denied, None)
    assert sleeps == []  # only UNAVAILABLE and DEADLINE_EXCEEDED are tried again


# -- background delivery (the production default: see services/worker/outbox.py) ---------------


@pytest.fixture
def background(store: LocalArtifactStore, reporter: RecordingReporter) -> Any:
    """An extract runner that hands its runs to its delivery thread; drained at the end."""
    runner = StageRunner(
        stages={"extract": ExtractStage(Extractor(None))},
        store=store,
        reporter=reporter,  # type: ignore[arg-type]
        background_deliveries=8,
    )
    yield runner
    runner.drain(10)


# distinct files with a text layer: no run is a cache hit of another
FILES = (
    "correspondence/call_notes.txt",
    "pleadings/complaint.pdf",
    "pleadings/answer.pdf",
    "discovery/interrogatories.docx",
)


def gate_first_record(reporter: RecordingReporter, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Holds the first RecordCosts call until the returned event is set."""
    release, record = threading.Event(), reporter.record_costs
    calls = []

    def held(request: Any) -> Any:
        calls.append(request)
        if len(calls) == 1:
            assert release.wait(10)
        return record(request)

    monkeypatch.setattr(reporter, "record_costs", held)
    return release


def test_runs_are_delivered_in_the_background_several_to_a_call(
    background: StageRunner, reporter: RecordingReporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = gate_first_record(reporter, monkeypatch)
    first = run(background, payload(FILES[0]))
    # the task returned while its delivery is held: nothing reported yet
    assert first["delivery"] == "queued" and first["succeeded"] and not reporter.results
    rest = [payload(f) for f in FILES[1:]]
    for p in rest:
        assert run(background, p)["delivery"] == "queued"
    release.set()
    assert background.drain(10)
    # the first run alone, then the three queued meanwhile in one RecordCosts and one call
    assert [len(r.events) for r in reporter.costs] == [1, 3]
    assert reporter.result_calls == [1, 3]
    by_document = {r.document_id: r for r in reporter.results}
    assert set(by_document) == {p.document_id for p in rest} | {reporter.results[0].document_id}
    for request in reporter.costs:
        for event in request.events:
            result = by_document[event.document_id]
            # each run's cost is its own events' amount, not the call's total
            assert Decimal(result.cost.amount) == Decimal(event.units) * RATE > 0
            assert len(result.artifacts) == 1, result
            (artifact,) = result.artifacts
            assert verify_artifact(
                artifact.uri, artifact.sha256, artifact.size_bytes, deep=True
            ).ok


def test_a_ledger_refusal_in_a_batch_costs_no_other_run_its_charge(
    background: StageRunner, reporter: RecordingReporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = gate_first_record(reporter, monkeypatch)
    run(background, payload(FILES[0]))
    odd, even = payload(FILES[1]), payload(FILES[2])
    events_of = background._cost_events

    def with_an_unpriced_event(p: Any, *args: Any) -> Any:
        events = events_of(p, *args)
        if p.document_id == odd.document_id:
            events.append(
                cost_service_pb2.CostEvent(
                    document_id=p.document_id, service="s3", operation="get_request", units="1"
                )
            )
        return events

    monkeypatch.setattr(background, "_cost_events", with_an_unpriced_event)
    reporter.unpriced = {("s3", "get_request")}
    run(background, odd)
    run(background, even)
    release.set()
    assert background.drain(10)
    # the batch's call refused; then one call per run (odd's twice: without its unpriced event)
    assert [len(r.events) for r in reporter.costs] == [1, 3, 2, 1, 1]
    assert all(r.succeeded and Decimal(r.cost.amount) > 0 for r in reporter.results)


def test_a_failed_sync_fails_the_batch_runs_as_io_errors_with_their_costs(
    background: StageRunner,
    store: LocalArtifactStore,
    reporter: RecordingReporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing(**_: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "sync", failing)
    run(background, payload(FILES[0]))
    assert background.drain(10)
    (result,) = reporter.results
    assert not result.succeeded and not result.artifacts and result.HasField("cost")
    assert (result.error_class, result.error_code) == (
        session_service_pb2.ERROR_CLASS_RETRYABLE,
        "io_error",
    )


def test_refused_results_are_logged_and_undeliverable_ones_tried_again(
    background: StageRunner, reporter: RecordingReporter, caplog: pytest.LogCaptureFixture
) -> None:
    unknown = payload(FILES[0])
    reporter.unknown = {unknown.document_id}
    run(background, unknown)
    assert background._outbox is not None and background._outbox.drain(10)
    assert "refused the result: NOT_FOUND" in caplog.text
    # a session service that is down: the run waits in the outbox and is tried again
    background._outbox.retry_base = 0.05
    reporter.result_error = grpc.StatusCode.UNAVAILABLE
    waiting = payload(FILES[1])
    run(background, waiting)
    assert not background._outbox.drain(0.5)
    assert "will try again" in caplog.text
    reporter.result_error = None
    later = payload(FILES[2])
    run(background, later)
    assert background.drain(10)
    delivered = [r.document_id for r in reporter.results]
    assert waiting.document_id in delivered and later.document_id in delivered
    # charged once: its events were recorded before the first attempt to report and kept
    charged = [e.document_id for c in reporter.costs for e in c.events]
    assert charged.count(waiting.document_id) == 1


def test_a_local_put_left_to_sync_is_made_durable_by_one_call(
    store: LocalArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import services.worker.artifacts as artifacts

    fsyncs: list[int] = []
    real_fsync, real_syncfs = os.fsync, artifacts._syncfs
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    refs = [store.put(f"{i:064x}", "extract", "v1", b'{"stats":{}}', durable=False) for i in (1, 2)]
    assert fsyncs == []
    synced: list[Path] = []
    monkeypatch.setattr(artifacts, "_syncfs", lambda path: synced.append(path) or True)
    store.sync()
    assert synced == [store.root] and fsyncs == []
    store.sync()  # nothing new: no call
    assert synced == [store.root]
    # where syncfs is missing: each file and its folder
    monkeypatch.setattr(artifacts, "_syncfs", lambda path: False)
    store.put(f"{3:064x}", "extract", "v1", b'{"stats":{}}', durable=False)
    store.sync()
    assert len(fsyncs) == 2
    for ref in refs:
        assert verify_artifact(ref.uri, ref.sha256, ref.size_bytes, deep=True).ok
    # the real syncfs: there on Linux, and it succeeds
    assert real_syncfs(store.root) is sys.platform.startswith("linux")


def test_a_permanent_failure_delivered_later_is_known_when_the_task_returns(
    background: StageRunner, reporter: RecordingReporter
) -> None:
    """What the task returns (Flower, logs, the worker's metrics) says permanent failure at once."""
    summary = run(background, payload("medical_records/sealed_records.pdf"))
    assert summary["delivery"] == "queued"
    assert not summary["succeeded"] and summary["error_code"] == "encrypted"
    assert background.drain(10)
    (result,) = reporter.results
    assert (result.error_class, result.error_code) == (
        session_service_pb2.ERROR_CLASS_PERMANENT,
        "encrypted",
    )
