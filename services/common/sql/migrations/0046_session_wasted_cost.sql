-- session: what a session spent on attempts that were lost or cancelled (a run
-- whose lease ran out, or that was under way when its session was cancelled),
-- reported by their workers after the fact. It is a part of reported_cost, so
-- that the session's cost holds every charge of the ledger; `docimport costs`
-- shows it as its own figure. Owned by the session service.
ALTER TABLE session.import_sessions
    ADD COLUMN wasted_cost numeric(38, 16) NOT NULL DEFAULT 0;
