-- session: stage-run counts per session and stage, so that GetSession, the
-- watch snapshots and the pipeline overview read a few rows instead of
-- counting every run of the session (18 ms a call at 10,000 documents, and
-- growing with the session). Owned by the session service.
--
-- Statement triggers on stage_runs append one delta row per session and
-- stage that a statement changed. Writers only insert deltas, never update
-- a shared row, so they never wait on each other for them (and take no new
-- lock that could order against the session row's). The reconciler folds
-- the deltas into stage_counts (SessionStore.fold_stage_counts); a reader
-- adds stage_counts and the deltas not folded yet, in one snapshot.
-- VerifySession compares the sum with a recount of stage_runs.
CREATE TABLE session.stage_count_deltas (
    session_id uuid    NOT NULL,
    stage      text    NOT NULL,
    queued     integer NOT NULL,
    running    integer NOT NULL,
    succeeded  integer NOT NULL,
    failed     integer NOT NULL,
    cache_hits integer NOT NULL
);
CREATE INDEX stage_count_deltas_session_idx ON session.stage_count_deltas (session_id);

CREATE TABLE session.stage_counts (
    session_id uuid    NOT NULL,
    stage      text    NOT NULL,
    queued     integer NOT NULL DEFAULT 0,
    running    integer NOT NULL DEFAULT 0,
    succeeded  integer NOT NULL DEFAULT 0,
    failed     integer NOT NULL DEFAULT 0,
    cache_hits integer NOT NULL DEFAULT 0,
    CONSTRAINT stage_counts_pkey PRIMARY KEY (session_id, stage),
    CONSTRAINT stage_counts_session_fkey FOREIGN KEY (session_id)
        REFERENCES session.import_sessions (session_id) ON DELETE CASCADE
);

-- The counted columns of a run, +1 or -1 each.
CREATE FUNCTION session.stage_run_counts(state text, cache_hit boolean, sign integer,
    OUT queued integer, OUT running integer, OUT succeeded integer, OUT failed integer,
    OUT cache_hits integer)
LANGUAGE sql IMMUTABLE AS $$
    SELECT sign * (state = 'queued')::int, sign * (state = 'running')::int,
           sign * (state = 'succeeded')::int, sign * (state = 'failed')::int,
           sign * (state = 'succeeded' AND cache_hit)::int
$$;

CREATE FUNCTION session.stage_runs_counted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO session.stage_count_deltas
        SELECT n.session_id, n.stage, sum(c.queued), sum(c.running), sum(c.succeeded),
               sum(c.failed), sum(c.cache_hits)
        FROM new_runs n, session.stage_run_counts(n.state, n.cache_hit, 1) c
        GROUP BY n.session_id, n.stage;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO session.stage_count_deltas
        SELECT session_id, stage, sum(queued), sum(running), sum(succeeded), sum(failed),
               sum(cache_hits)
        FROM (SELECT n.session_id, n.stage, c.*
              FROM new_runs n, session.stage_run_counts(n.state, n.cache_hit, 1) c
              UNION ALL
              SELECT o.session_id, o.stage, c.*
              FROM old_runs o, session.stage_run_counts(o.state, o.cache_hit, -1) c) t
        GROUP BY session_id, stage
        HAVING sum(queued) <> 0 OR sum(running) <> 0 OR sum(succeeded) <> 0
            OR sum(failed) <> 0 OR sum(cache_hits) <> 0;
    ELSE
        INSERT INTO session.stage_count_deltas
        SELECT o.session_id, o.stage, sum(c.queued), sum(c.running), sum(c.succeeded),
               sum(c.failed), sum(c.cache_hits)
        FROM old_runs o, session.stage_run_counts(o.state, o.cache_hit, -1) c
        GROUP BY o.session_id, o.stage;
    END IF;
    RETURN NULL;
END
$$;

-- A trigger with transition tables serves one event, hence three.
CREATE TRIGGER stage_runs_counted_insert AFTER INSERT ON session.stage_runs
    REFERENCING NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION session.stage_runs_counted();
CREATE TRIGGER stage_runs_counted_update AFTER UPDATE ON session.stage_runs
    REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION session.stage_runs_counted();
CREATE TRIGGER stage_runs_counted_delete AFTER DELETE ON session.stage_runs
    REFERENCING OLD TABLE AS old_runs
    FOR EACH STATEMENT EXECUTE FUNCTION session.stage_runs_counted();

-- The runs written before this migration.
INSERT INTO session.stage_counts
SELECT r.session_id, r.stage, sum(c.queued), sum(c.running), sum(c.succeeded), sum(c.failed),
       sum(c.cache_hits)
FROM session.stage_runs r, session.stage_run_counts(r.state, r.cache_hit, 1) c
GROUP BY r.session_id, r.stage;
