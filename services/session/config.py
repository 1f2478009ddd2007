"""Settings of the session service (environment variables `DOCIMPORT_*`)."""

from __future__ import annotations

from pydantic import Field

from services.common.config import ServiceSettings


class SessionSettings(ServiceSettings):
    """`DOCIMPORT_PORT` defaults to 50062 for this service."""

    port: int = 50062
    # Celery broker; the session service is the only component that enqueues.
    broker_url: str
    # Most stage runs queued or running at once, all sessions together.
    max_in_flight_total: int = 512
    # A session's own cap when its creator gives none (SessionOptions.max_in_flight).
    # Enough to keep a fleet busy: the production overlay lets KEDA grow to
    # 104 worker processes by queue length, and a queue must hold runs for it
    # to grow. At 32, two no-op worker processes found their queues empty in
    # 16% of the samples (bench/session_end_to_end.py, 2026-12-04).
    default_max_in_flight: int = Field(default=256, ge=1, le=1_000_000)
    # Documents claimed per dispatcher round (per session).
    dispatch_batch: int = 500
    # Seconds between dispatcher rounds when there is nothing to wake it.
    dispatch_interval: float = 0.5
    # Seconds a woken dispatcher waits before its round, so that the stage
    # results arriving meanwhile are dispatched in the same round (0: none).
    dispatch_coalesce: float = 0.02
    # A session gets a dispatch round once this fraction of its in-flight cap
    # is free, or as soon as fewer runs than that wait in the queue (so the
    # workers never run dry): a round then carries several documents rather
    # than the one each stage result frees. Caps of 4 or less: every free slot.
    dispatch_topup: float = 0.25
    # Messages per Redis pipeline when publishing.
    publish_batch: int = 1000
    # Run time of a stage: base seconds plus seconds per MiB of the file. The
    # worker gets it as its soft time limit (the hard limit adds
    # `time_limit_grace`) and stops a run by then.
    lease_base: float = 300.0
    lease_per_mib: float = 2.0
    time_limit_grace: float = 30.0
    # A queued or running stage run holds a lease of `lease_ttl` seconds that
    # the lease keeper (services/session/leases.py) renews every
    # `probe_interval` seconds while the run is seen alive: its message waits
    # in a stage queue, or a worker holds it (prefetched, running, or finished
    # and waiting in the worker's outbox). A run unseen for `lease_ttl` is
    # lost (a killed worker, a flushed broker): the reconciler expires it and
    # its document gets a new attempt. Expiry waits until the keeper has been
    # seeing for a whole `lease_ttl` (after a start or an outage of Postgres
    # or the broker), so nothing is expired for want of a look.
    lease_ttl: float = Field(default=45.0, ge=1.0)
    probe_interval: float = Field(default=5.0, gt=0)
    # How long a probe waits for the workers' answers.
    probe_timeout: float = Field(default=1.0, gt=0)
    # How long a message may wait in its queue before a worker drops it unread
    # (Celery's `expires`). Its run's lease is renewed meanwhile; a message
    # older than this belongs to a run expired long ago.
    queue_wait: float = 6 * 3600.0
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
    # Days a finished session's events stay in the database for watchers to
    # replay (resume_after_seq); older ones are deleted by the reconciler, and
    # a watcher resuming into them gets the session's snapshot instead.
    # 0 keeps them forever.
    event_retention_days: float = 30.0
    # Events kept in memory per watched session (shared by its watchers).
    watch_buffer: int = 8192
    # A watcher further behind than this many events (a slow client, or a
    # resume from long ago) gets one snapshot instead of the backlog.
    watch_coalesce_after: int = 5000
    # Stage reports applied per database transaction at most, and how many
    # such batches (of each kind) may be in flight at once.
    report_batch: int = 256
    report_concurrency: int = 1
    # How long a live session's cost so far (a sum over its cost ledger) is
    # reused by GetSession and the watch snapshots, seconds (0: never).
    cost_cache_seconds: float = 1.0
    # Deadline of calls to the manifest and cost services, seconds.
    dependency_timeout: float = 30.0
    # Files per ListManifestFiles page when a session is created.
    manifest_page_size: int = 1000
    # Pipeline overview: how long workers get to answer the broadcast ping,
    # and how long their answer is reused.
    worker_ping_timeout: float = 1.0
    worker_cache_seconds: float = 5.0
