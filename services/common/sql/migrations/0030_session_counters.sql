-- session: document counters kept in the same transaction as each change,
-- per-stage cost estimates for budget reservations, dispatch bookkeeping and
-- progress samples for throughput and ETA. Owned by the session service.

-- Counters of session_documents by state, updated in the same transaction as
-- every document change (the session row is also where the per-session event
-- sequence is assigned, so both are serialised by the same row lock).
-- VerifySession recounts and reports any drift.
ALTER TABLE session.import_sessions
    ADD COLUMN count_pending   integer        NOT NULL DEFAULT 0,
    ADD COLUMN count_queued    integer        NOT NULL DEFAULT 0,
    ADD COLUMN count_running   integer        NOT NULL DEFAULT 0,
    ADD COLUMN count_completed integer        NOT NULL DEFAULT 0,
    ADD COLUMN count_failed    integer        NOT NULL DEFAULT 0,
    ADD COLUMN count_skipped   integer        NOT NULL DEFAULT 0,
    ADD COLUMN count_cancelled integer        NOT NULL DEFAULT 0,
    -- Sum of the costs workers reported for this session's stage runs.
    ADD COLUMN reported_cost   numeric(38, 16) NOT NULL DEFAULT 0,
    ADD CONSTRAINT import_sessions_counts_check CHECK (
        count_pending >= 0 AND count_queued >= 0 AND count_running >= 0
        AND count_completed >= 0 AND count_failed >= 0 AND count_skipped >= 0
        AND count_cancelled >= 0);

ALTER TABLE session.session_documents
    -- Highest attempt number used for the current stage (the next run is +1).
    ADD COLUMN attempt_seq     integer        NOT NULL DEFAULT 0,
    -- The estimate of the whole file (the manifest's pricing). With a
    -- budget, a document is admitted by reserving it before its first stage
    -- is enqueued; the reservation stays open until the document is
    -- completed, failed or cancelled, then is settled with what it cost.
    ADD COLUMN estimated_cost  numeric(38, 16) NOT NULL DEFAULT 0,
    ADD COLUMN reservation_id  uuid,
    ADD COLUMN reserved_amount numeric(38, 16),
    -- What the manifest scan found wrong with the file, if anything.
    ADD COLUMN problem_kind    text,
    ADD COLUMN mime_type       text           NOT NULL DEFAULT '',
    ADD CONSTRAINT session_documents_attempts_check CHECK (attempts >= 0 AND attempt_seq >= 0);

-- Ledger amounts are exact products (units x unit price: up to 16
-- fractional digits, see the cost section); costs mirrored here must not be
-- rounded either.
ALTER TABLE session.import_sessions ALTER COLUMN estimated_cost TYPE numeric(38, 16);
ALTER TABLE session.session_documents ALTER COLUMN cost TYPE numeric(38, 16);
ALTER TABLE session.stage_runs
    ALTER COLUMN cost TYPE numeric(38, 16),
    ALTER COLUMN reserved_amount TYPE numeric(38, 16);

-- Documents waiting for their next stage or a retry are dispatched before
-- documents that have not started.
CREATE INDEX session_documents_resume_idx
    ON session.session_documents (session_id, dispatch_rank, ordinal)
    WHERE state = 'pending' AND stage IS NOT NULL;

-- Finished-document counts sampled by the reconciler, for documents per
-- second and the ETA (kept for a few minutes).
CREATE TABLE session.progress_samples (
    session_id uuid        NOT NULL,
    sampled_at timestamptz NOT NULL DEFAULT now(),
    finished   integer     NOT NULL,
    CONSTRAINT progress_samples_pkey PRIMARY KEY (session_id, sampled_at),
    CONSTRAINT progress_samples_session_fkey FOREIGN KEY (session_id)
        REFERENCES session.import_sessions (session_id) ON DELETE CASCADE
);
