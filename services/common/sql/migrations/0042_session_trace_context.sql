-- session: the trace context of the call that started a session's work.
-- The W3C traceparent of the CreateSession (with start), StartSession,
-- ResumeSession or RetryDocuments call being served when tracing is on;
-- the dispatcher publishes each stage run as a child of it, so one trace
-- runs from the operator's command to the workers' reports. NULL when
-- tracing is off. Owned by the session service.
ALTER TABLE session.import_sessions
    ADD COLUMN trace_context text;
