"""Settings of the session service (environment variables `DOCIMPORT_*`)."""

from __future__ import annotations

from services.common.config import ServiceSettings


class SessionSettings(ServiceSettings):
    """`DOCIMPORT_PORT` defaults to 50062 for this service."""

    port: int = 50062
    # Celery broker; the session service is the only component that enqueues.
    broker_url: str
    # Most stage runs queued or running at once, all sessions together.
    max_in_flight_total: int = 512
    # Documents claimed per dispatcher round.
    dispatch_batch: int = 500
    # Seconds between dispatcher rounds when there is nothing to wake it.
    dispatch_interval: float = 0.5
    # Lease of a stage run: base seconds plus seconds per MiB of the file.
    lease_base: float = 300.0
    lease_per_mib: float = 2.0
    # Seconds between reconciler passes over expired leases.
    reconcile_interval: float = 5.0
    # Attempts of a stage before a retryable error becomes a failure.
    max_attempts: int = 3
    # Backoff of retryable errors: base * 2**(attempt-1) seconds, capped.
    retry_backoff_base: float = 2.0
    retry_backoff_max: float = 300.0
    # A queued or running document with no progress for this long is stalled.
    stall_after: float = 600.0
    # Seconds between heartbeats on idle watch streams.
    heartbeat_interval: float = 15.0
