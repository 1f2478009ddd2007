"""Worker settings from the environment, the Celery configuration and the command line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from docimport.session.v1 import session_service_pb2
from pydantic import ValidationError

from services.common import convert
from services.common.tasks import QUEUES, TASK_NAMES
from services.worker.__main__ import worker_argv
from services.worker.app import create_app
from services.worker.config import WorkerSettings
from services.worker.runner import StageRunner

from .helpers import payload


def test_settings_come_from_docimport_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCIMPORT_BROKER_URL", "redis+socket:///tmp/redis.sock")
    monkeypatch.setenv("DOCIMPORT_TOKEN", "wk-secret")
    monkeypatch.setenv("DOCIMPORT_QUEUES", "extract, entities")
    monkeypatch.setenv("DOCIMPORT_OCR_ENGINE", "tesseract")
    monkeypatch.setenv("DOCIMPORT_ARTIFACT_DIR", str(tmp_path))
    monkeypatch.setenv("DOCIMPORT_CONCURRENCY", "4")
    settings = WorkerSettings()
    assert settings.queues == ("extract", "entities")
    assert settings.token.get_secret_value() == "wk-secret"
    assert settings.store_url == tmp_path.resolve().as_uri()
    assert settings.effective_concurrency == 4
    assert settings.effective_ocr_threads >= 1
    argv = worker_argv(settings)
    assert argv[:7] == [
        "worker",
        "--queues",
        "extract,entities",
        "--pool",
        "prefork",
        "--concurrency",
        "4",
    ]
    assert "--task-events" in argv
    monkeypatch.setenv("DOCIMPORT_ARTIFACT_URL", "s3://bucket/prefix")
    assert WorkerSettings().store_url == "s3://bucket/prefix"


def test_bad_settings_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="broker_url"):
        WorkerSettings()
    monkeypatch.setenv("DOCIMPORT_BROKER_URL", "redis://localhost/0")
    for name, value in (
        ("DOCIMPORT_QUEUES", "ocr"),
        ("DOCIMPORT_OCR_ENGINE", "magic"),
        ("DOCIMPORT_POOL", "eventlet"),
    ):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError):
            WorkerSettings()
        monkeypatch.delenv(name)


def test_celery_configuration_follows_the_contract() -> None:
    settings = WorkerSettings(broker_url="redis://localhost:6379/0", visibility_timeout=7200)
    app = create_app(settings)
    conf = app.conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert (
        conf.task_acks_late
        and conf.task_reject_on_worker_lost
        and conf.worker_prefetch_multiplier == 1
    )
    assert conf.task_ignore_result and conf.result_backend is None
    assert conf.task_track_started and conf.worker_send_task_events and conf.task_send_sent_event
    assert conf.broker_transport_options["visibility_timeout"] == 7200 > conf.task_time_limit
    assert {q.name for q in conf.task_queues} == set(QUEUES.values())
    # children are replaced by memory (KiB for Celery) and, as a backstop, by task count
    assert conf.worker_max_memory_per_child == settings.max_memory_per_child * 1024 > 0
    assert conf.worker_max_tasks_per_child == settings.max_tasks_per_child > 0
    for stage, name in TASK_NAMES.items():
        task = app.tasks[name]
        assert task.acks_late and task.ignore_result and task.queue == QUEUES[stage]
        assert task.max_retries == 0
    assert not [
        name
        for name in app.tasks
        if name.startswith("docimport.") and name not in TASK_NAMES.values()
    ]
    app.close()


def test_child_replacement_can_be_turned_off() -> None:
    settings = WorkerSettings(
        broker_url="redis://localhost:6379/0", max_memory_per_child=0, max_tasks_per_child=0
    )
    app = create_app(settings)
    assert app.conf.worker_max_memory_per_child is None
    assert app.conf.worker_max_tasks_per_child is None
    app.close()


def test_the_lease_is_the_earlier_of_the_payloads_and_the_sessions() -> None:
    p = payload("pleadings/complaint.pdf", lease_seconds=100.0)
    no_lease = session_service_pb2.ReportStageStartedResponse(proceed=True)
    assert StageRunner._lease_left(p, no_lease) == pytest.approx(90.0)
    soon = convert.timestamp(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20))
    started = session_service_pb2.ReportStageStartedResponse(proceed=True, lease_expires_at=soon)
    assert 17.0 < StageRunner._lease_left(p, started) <= 18.0
    past = convert.timestamp(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=20))
    expired = session_service_pb2.ReportStageStartedResponse(proceed=True, lease_expires_at=past)
    assert StageRunner._lease_left(p, expired) == 1.0


def test_metrics_listen_on_loopback_unless_metrics_host_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.common.localinfra import free_port
    from services.worker import metrics as worker_metrics

    monkeypatch.setenv("DOCIMPORT_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DOCIMPORT_POOL", "solo")  # no multiprocess files
    for env, expected in ((None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")):
        if env:
            monkeypatch.setenv("DOCIMPORT_METRICS_HOST", env)
        monkeypatch.setenv("DOCIMPORT_METRICS_PORT", str(free_port()))
        settings = WorkerSettings()
        http = worker_metrics.serve(settings, worker_metrics.WorkerMetrics(settings))
        try:
            assert http is not None and http.host == expected
        finally:
            http.stop()
