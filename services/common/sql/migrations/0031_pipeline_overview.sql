-- session: indexes of the pipeline overview (GetPipelineOverview, `docimport
-- top`). Each keeps one of its queries off a scan of a whole table that grows
-- with every import.

-- Stage runs that ended in the last hour or day: throughput, durations and
-- error rates per stage.
CREATE INDEX stage_runs_finished_idx ON session.stage_runs (finished_at)
    WHERE finished_at IS NOT NULL;

-- The latest failed documents of all sessions.
CREATE INDEX session_documents_failed_idx ON session.session_documents (updated_at)
    WHERE state = 'failed';

-- In-flight documents by last progress: stalled documents of all sessions.
CREATE INDEX session_documents_in_flight_idx ON session.session_documents (updated_at)
    WHERE state IN ('queued', 'running');
