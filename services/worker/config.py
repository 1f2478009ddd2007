"""Settings of a Celery worker process (environment variables `DOCIMPORT_*`).

A worker is a gRPC *client* of the session and cost services, so it extends
`ClientSettings` (`DOCIMPORT_SESSION_ADDR`, `DOCIMPORT_COST_ADDR`, and
`DOCIMPORT_TOKEN`, which must be a token of the `worker` scope) with the
broker, the artifact store, the OCR engine and the pool. Nothing else in the
worker reads the environment.

`visibility_timeout` must exceed the longest `time_limit` the session
service gives a task: Redis re-delivers an unacknowledged message after it,
and with `acks_late` a long task still running would then run twice (the
second run is harmless - ReportStageStarted answers proceed=false - but
wasted).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from services.common.config import ClientSettings, CommaList, MetricsSettings
from services.common.tasks import STAGES

OcrEngineName = Literal["auto", "rapidocr", "tesseract", "textract", "none"]


def _split(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class WorkerSettings(ClientSettings, MetricsSettings):
    """Everything a `docimport-worker` process is configured with."""

    # Celery broker: redis://host:port/db or redis+socket:///path/redis.sock.
    broker_url: str
    # Local artifact store root (used when artifact_url is unset).
    artifact_dir: Path = Path("./var/artifacts")
    # Optional artifact store URL: file:///abs/dir or s3://bucket/prefix (boto3;
    # the endpoint comes from boto3's own AWS_ENDPOINT_URL_S3 / AWS_* variables).
    artifact_url: str | None = None
    # OCR of pages and images with no text: auto picks rapidocr, else
    # tesseract when its binary is on PATH, else none (text layers only).
    ocr_engine: OcrEngineName = "auto"
    # Rendering resolution of a PDF page for OCR.
    ocr_dpi: int = 200
    # Threads of one OCR inference; 0 = CPU cores / concurrency.
    ocr_threads: int = 0
    # tesseract binary and language(s), when ocr_engine is tesseract.
    tesseract_cmd: str = "tesseract"
    tesseract_lang: str = "eng"
    # AWS region of Textract (credentials come from boto3's usual chain).
    textract_region: str = "us-east-1"
    # Queues this worker consumes (comma-separated).
    queues: CommaList = STAGES
    # Worker processes (prefork) or threads; 0 = CPU cores.
    concurrency: int = 0
    # prefork (production: time limits are enforced), solo or threads.
    pool: Literal["prefork", "solo", "threads"] = "prefork"
    # Seconds Redis waits before re-delivering an unacknowledged message.
    visibility_timeout: float = 4 * 3600.0
    # Hard and soft time limits when the message carries none, seconds.
    default_time_limit: float = 3600.0
    default_soft_time_limit: float = 3300.0
    # A run reports its start (ReportStageStarted) only once it has lasted
    # this many seconds; a shorter run reports only its result, one round trip
    # to the session service instead of two. A run is still asked about first
    # when it may have been superseded: its message was redelivered, or its
    # first lease is near its end (see runner.py). 0 = every run reports its
    # start before working.
    started_after: float = 1.0
    # Finished runs a worker process may hold for delivery by its background
    # thread (RecordCosts and ReportStageResults, several runs together): a
    # task returns once its work is done and its run is in the outbox. 0 =
    # every task delivers its own run before it returns.
    background_deliveries: int = Field(default=16, ge=0)
    # The outbox journal's directory (default: `outbox` beside artifact_dir):
    # finished runs wait there until the session service has them, so a
    # process killed before it delivered them loses nothing; the worker's
    # next process on the same directory delivers them. In Kubernetes, a
    # volume that outlives the container.
    outbox_dir: Path | None = None
    # How long a finished run's delivery is tried again (with backoff up to
    # 30 s) while the services do not take it, seconds.
    outbox_max_age: float = Field(default=7 * 24 * 3600.0, gt=0)
    # Seconds the delivery thread waits for more finished runs after the first
    # of a delivery (fewer, larger calls for a little latency). With no-op
    # stages, 40 ms instead of 10 made about 10 runs a delivery instead of 4
    # (bench/session_end_to_end.py); a real stage takes seconds.
    delivery_linger: float = Field(default=0.04, ge=0, le=1)
    # Attempts of a report to a service that answers UNAVAILABLE.
    report_attempts: int = 4
    report_backoff: float = 0.5
    # Chunking: target characters per chunk and overlap between chunks.
    chunk_size: int = 2000
    chunk_overlap: int = 200
    # A prefork child is replaced once its resident memory passes this many
    # MiB after a task (bounds native leaks where they show; 0 = never), and
    # in any case after this many tasks (0 = never). A fresh child reloads
    # its OCR engine (seconds) and reconnects to the services, so a small
    # task count costs more than it saves: with 200, 2,000 no-op documents
    # took 24.5 s instead of 18.4 s (bench/session_end_to_end.py).
    max_memory_per_child: int = Field(default=1536, ge=0)
    max_tasks_per_child: int = Field(default=5000, ge=0)
    log_level: str = "INFO"
    # /metrics (metrics_port, metrics_host: MetricsSettings) is served by the
    # main process; with the prefork pool the children's samples go through
    # files in metrics_dir (default: a fresh temporary directory). It is
    # emptied at start: give each worker its own. See services/worker/metrics.py.
    metrics_dir: Path | None = None
    # HTTP port of the /livez and /readyz probe (services.worker.health); 0 = off.
    health_port: int = 0

    _split_queues = field_validator("queues", mode="before")(_split)

    @field_validator("queues")
    @classmethod
    def _known_queues(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [q for q in value if q not in STAGES]
        if unknown or not value:
            raise ValueError(
                f"queues must be among {', '.join(STAGES)}; got {', '.join(value) or 'none'}"
            )
        return value

    @property
    def effective_concurrency(self) -> int:
        return self.concurrency or (os.cpu_count() or 1)

    @property
    def effective_ocr_threads(self) -> int:
        if self.ocr_threads:
            return self.ocr_threads
        if self.pool == "solo":
            return os.cpu_count() or 1
        return max(1, (os.cpu_count() or 1) // self.effective_concurrency)

    @property
    def effective_outbox_dir(self) -> Path:
        return self.outbox_dir or self.artifact_dir.parent / "outbox"

    @property
    def store_url(self) -> str:
        """The artifact store as a URL (file:// of artifact_dir by default)."""
        if self.artifact_url:
            return self.artifact_url
        return self.artifact_dir.resolve().as_uri()
