-- docimport initial schema: one Postgres schema per owning service.
-- Only the owning service writes its tables. References across services are
-- by id, checked over gRPC, never by foreign key: each service can be
-- deployed, restored and migrated on its own terms.
-- Money is NUMERIC with 8 fractional digits, never rounded per row.

CREATE SCHEMA IF NOT EXISTS manifest;
CREATE SCHEMA IF NOT EXISTS cost;
CREATE SCHEMA IF NOT EXISTS session;

-- ---------------------------------------------------------------- manifest

CREATE TABLE manifest.manifests (
    manifest_id        uuid        NOT NULL,
    request_id         text,
    case_name          text        NOT NULL,
    source_path        text        NOT NULL,
    state              text        NOT NULL,
    error              text,
    schema_version     integer     NOT NULL DEFAULT 1,
    options            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    summary            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    price_book_version integer,
    -- Exact sums of the cost service's per-file estimates (8 + 8 digits), never rounded.
    estimated_total    numeric(38, 16),
    created_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    deleted_at         timestamptz,
    CONSTRAINT manifests_pkey PRIMARY KEY (manifest_id),
    CONSTRAINT manifests_request_id_key UNIQUE (request_id),
    CONSTRAINT manifests_state_check
        CHECK (state IN ('scanning', 'ready', 'failed', 'deleted')),
    CONSTRAINT manifests_case_name_check CHECK (length(btrim(case_name)) > 0)
);
CREATE INDEX manifests_case_name_idx ON manifest.manifests (case_name, created_at DESC);

CREATE TABLE manifest.manifest_files (
    file_id               uuid        NOT NULL,
    manifest_id           uuid        NOT NULL,
    ordinal               integer     NOT NULL,
    relative_path         text        NOT NULL,
    raw_path              bytea       NOT NULL,
    size_bytes            bigint      NOT NULL,
    modified_at           timestamptz,
    sha256                text,
    mime_type             text        NOT NULL DEFAULT 'application/octet-stream',
    extension_mismatch    boolean     NOT NULL DEFAULT false,
    type_family           text        NOT NULL DEFAULT 'other',
    category              text        NOT NULL,
    priority              integer     NOT NULL DEFAULT 100,
    plan                  text        NOT NULL,
    page_count            integer     NOT NULL DEFAULT 0,
    ocr_page_count        integer     NOT NULL DEFAULT 0,
    problem_kind          text,
    problem_message       text,
    duplicate_of_file_id  uuid,
    exclusion_reason      text,
    family_parent_file_id uuid,
    estimated_cost        numeric(38, 16),
    CONSTRAINT manifest_files_pkey PRIMARY KEY (file_id),
    CONSTRAINT manifest_files_manifest_fkey FOREIGN KEY (manifest_id)
        REFERENCES manifest.manifests (manifest_id) ON DELETE CASCADE,
    CONSTRAINT manifest_files_duplicate_of_fkey FOREIGN KEY (duplicate_of_file_id)
        REFERENCES manifest.manifest_files (file_id) ON DELETE CASCADE,
    CONSTRAINT manifest_files_family_parent_fkey FOREIGN KEY (family_parent_file_id)
        REFERENCES manifest.manifest_files (file_id) ON DELETE CASCADE,
    CONSTRAINT manifest_files_path_key UNIQUE (manifest_id, raw_path),
    CONSTRAINT manifest_files_ordinal_key UNIQUE (manifest_id, ordinal),
    CONSTRAINT manifest_files_size_check CHECK (size_bytes >= 0),
    CONSTRAINT manifest_files_pages_check
        CHECK (page_count >= 0 AND ocr_page_count >= 0 AND ocr_page_count <= page_count),
    CONSTRAINT manifest_files_sha256_check CHECK (sha256 IS NULL OR sha256 ~ '^[0-9a-f]{64}$'),
    CONSTRAINT manifest_files_plan_check CHECK (plan IN
        ('text_layer', 'ocr', 'docx', 'email', 'image', 'text', 'unsupported')),
    CONSTRAINT manifest_files_problem_check CHECK (problem_kind IS NULL OR problem_kind IN
        ('empty', 'corrupt', 'encrypted', 'unreadable', 'unsupported', 'too_large', 'not_a_file'))
);
CREATE INDEX manifest_files_sha256_idx ON manifest.manifest_files (manifest_id, sha256);

-- -------------------------------------------------------------------- cost
-- Owned by the cost service. Prices and plan units carry 8 fractional digits;
-- ledger amounts are exact products units x unit_price (8 + 8 = 16 digits),
-- so an event is never rounded and sums are exact.

CREATE TABLE cost.price_books (
    version       integer     NOT NULL,
    name          text        NOT NULL,
    description   text        NOT NULL DEFAULT '',
    currency_code text        NOT NULL DEFAULT 'USD',
    request_id    text,
    source_toml   text,
    published_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT price_books_pkey PRIMARY KEY (version),
    CONSTRAINT price_books_request_id_key UNIQUE (request_id),
    CONSTRAINT price_books_version_check CHECK (version > 0),
    CONSTRAINT price_books_name_check CHECK (length(btrim(name)) > 0)
);

CREATE TABLE cost.prices (
    version     integer        NOT NULL,
    service     text           NOT NULL,
    operation   text           NOT NULL,
    unit        text           NOT NULL,
    unit_price  numeric(20, 8) NOT NULL,
    description text           NOT NULL DEFAULT '',
    CONSTRAINT prices_pkey PRIMARY KEY (version, service, operation),
    CONSTRAINT prices_version_fkey FOREIGN KEY (version)
        REFERENCES cost.price_books (version),
    CONSTRAINT prices_unit_price_check CHECK (unit_price >= 0)
);

-- A plan at a stage costs units_per x basis of one priced operation, where
-- basis is counted per file: file (1), page, ocr_page (pages without a text
-- layer), text_page (page - ocr_page) or mb (size_bytes / 1,000,000).
CREATE TABLE cost.plan_rules (
    version   integer        NOT NULL,
    plan      text           NOT NULL,
    stage     text           NOT NULL,
    service   text           NOT NULL,
    operation text           NOT NULL,
    basis     text           NOT NULL,
    units_per numeric(20, 8) NOT NULL,
    CONSTRAINT plan_rules_pkey PRIMARY KEY (version, plan, stage, service, operation, basis),
    CONSTRAINT plan_rules_price_fkey FOREIGN KEY (version, service, operation)
        REFERENCES cost.prices (version, service, operation),
    CONSTRAINT plan_rules_plan_check CHECK (plan IN
        ('text_layer', 'ocr', 'docx', 'email', 'image', 'text', 'unsupported')),
    CONSTRAINT plan_rules_stage_check CHECK (stage IN ('extract', 'chunk', 'entities')),
    CONSTRAINT plan_rules_basis_check
        CHECK (basis IN ('file', 'page', 'ocr_page', 'text_page', 'mb')),
    CONSTRAINT plan_rules_units_per_check CHECK (units_per >= 0)
);

-- The ledger. event_id is derived from the idempotency key (uuid5), so a
-- replayed event conflicts on both keys and is never charged twice.
-- price_book_version has no foreign key on purpose: price books are never
-- deleted, the service only prices with versions it has loaded, and a
-- foreign key would take a KEY SHARE lock on one price_books row for every
-- inserted event, the hot path of every worker.
CREATE TABLE cost.cost_events (
    event_id           uuid           NOT NULL,
    session_id         uuid           NOT NULL,
    document_id        uuid,
    stage              text           NOT NULL DEFAULT '',
    attempt            integer        NOT NULL DEFAULT 0,
    service            text           NOT NULL,
    operation          text           NOT NULL,
    kind               text           NOT NULL,
    units              numeric(24, 8) NOT NULL,
    unit_price         numeric(20, 8) NOT NULL,
    amount             numeric(38, 16) NOT NULL,
    saved              numeric(38, 16) NOT NULL DEFAULT 0,
    cache_hit          boolean        NOT NULL DEFAULT false,
    category           text           NOT NULL DEFAULT '',
    price_book_version integer        NOT NULL,
    occurred_at        timestamptz    NOT NULL DEFAULT now(),
    recorded_at        timestamptz    NOT NULL DEFAULT now(),
    CONSTRAINT cost_events_pkey PRIMARY KEY (event_id),
    CONSTRAINT cost_events_idempotency_key UNIQUE NULLS NOT DISTINCT
        (session_id, document_id, stage, attempt, service, operation, kind),
    CONSTRAINT cost_events_kind_check CHECK (kind IN ('estimate', 'actual')),
    CONSTRAINT cost_events_stage_check CHECK (stage IN ('', 'extract', 'chunk', 'entities')),
    CONSTRAINT cost_events_attempt_check CHECK (attempt >= 0),
    CONSTRAINT cost_events_units_check CHECK (units >= 0),
    CONSTRAINT cost_events_amount_check CHECK (amount >= 0 AND saved >= 0),
    -- Exact, never rounded: a cache hit costs nothing and saves the price.
    CONSTRAINT cost_events_amount_exact_check CHECK (CASE WHEN cache_hit
        THEN amount = 0 AND saved = units * unit_price
        ELSE amount = units * unit_price AND saved = 0 END)
);
CREATE INDEX cost_events_session_idx ON cost.cost_events (session_id, recorded_at, event_id);
CREATE INDEX cost_events_document_idx ON cost.cost_events (document_id);

-- reserved = the sum of the open reservations' amounts; the reserve path
-- grants only while reserved + spent + amount <= limit_amount (under the row
-- lock). spent may pass the limit through overruns (actual > reserved) and
-- the limit may be lowered below what is used: remaining is then zero.
CREATE TABLE cost.budgets (
    session_id    uuid            NOT NULL,
    limit_amount  numeric(38, 16) NOT NULL,
    reserved      numeric(38, 16) NOT NULL DEFAULT 0,
    spent         numeric(38, 16) NOT NULL DEFAULT 0,
    overrun       numeric(38, 16) NOT NULL DEFAULT 0,
    currency_code text            NOT NULL DEFAULT 'USD',
    created_at    timestamptz     NOT NULL DEFAULT now(),
    updated_at    timestamptz     NOT NULL DEFAULT now(),
    CONSTRAINT budgets_pkey PRIMARY KEY (session_id),
    CONSTRAINT budgets_limit_check CHECK (limit_amount >= 0),
    CONSTRAINT budgets_amounts_check CHECK (reserved >= 0 AND spent >= 0 AND overrun >= 0),
    CONSTRAINT budgets_overrun_check CHECK (overrun <= spent)
);

CREATE TABLE cost.reservations (
    reservation_id uuid            NOT NULL,
    session_id     uuid            NOT NULL,
    key            text            NOT NULL,
    amount         numeric(38, 16) NOT NULL,
    actual         numeric(38, 16),
    state          text            NOT NULL DEFAULT 'open',
    expires_at     timestamptz     NOT NULL,
    created_at     timestamptz     NOT NULL DEFAULT now(),
    closed_at      timestamptz,
    CONSTRAINT reservations_pkey PRIMARY KEY (reservation_id),
    CONSTRAINT reservations_budget_fkey FOREIGN KEY (session_id)
        REFERENCES cost.budgets (session_id) ON DELETE CASCADE,
    CONSTRAINT reservations_key UNIQUE (session_id, key),
    CONSTRAINT reservations_state_check
        CHECK (state IN ('open', 'settled', 'released', 'expired')),
    CONSTRAINT reservations_amount_check CHECK (amount >= 0 AND (actual IS NULL OR actual >= 0)),
    CONSTRAINT reservations_actual_check CHECK ((state = 'settled') = (actual IS NOT NULL)),
    CONSTRAINT reservations_closed_check CHECK ((state = 'open') = (closed_at IS NULL))
);
CREATE INDEX reservations_open_idx ON cost.reservations (session_id, expires_at) WHERE state = 'open';
CREATE INDEX reservations_expiry_idx ON cost.reservations (expires_at) WHERE state = 'open';

-- WatchCosts streams wake on NOTIFY docimport_cost '<session_id>' when a
-- session's ledger or budget changes: the ledger insert statement notifies
-- the sessions it inserted into (cheaper than a trigger's transition
-- table); budgets notify through this trigger.
CREATE FUNCTION cost.notify_budget_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('docimport_cost', NEW.session_id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER budgets_notify AFTER INSERT OR UPDATE ON cost.budgets
    FOR EACH ROW EXECUTE FUNCTION cost.notify_budget_changed();

-- ----------------------------------------------------------------- session

CREATE TABLE session.projects (
    project_id uuid        NOT NULL,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projects_pkey PRIMARY KEY (project_id),
    CONSTRAINT projects_name_check CHECK (length(btrim(name)) > 0)
);
-- One project per name, whatever its case or surrounding blanks.
CREATE UNIQUE INDEX projects_name_key ON session.projects (lower(btrim(name)));

CREATE TABLE session.import_sessions (
    session_id        uuid           NOT NULL,
    request_id        text,
    project_id        uuid           NOT NULL,
    manifest_id       uuid           NOT NULL,
    source_path       text           NOT NULL,
    state             text           NOT NULL DEFAULT 'created',
    state_reason      text           NOT NULL DEFAULT '',
    budget_limit      numeric(24, 8),
    max_in_flight     integer        NOT NULL DEFAULT 32,
    category_priority text[]         NOT NULL DEFAULT '{}',
    estimated_cost    numeric(24, 8),
    total_documents   integer        NOT NULL DEFAULT 0,
    last_seq          bigint         NOT NULL DEFAULT 0,
    created_at        timestamptz    NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    updated_at        timestamptz    NOT NULL DEFAULT now(),
    CONSTRAINT import_sessions_pkey PRIMARY KEY (session_id),
    CONSTRAINT import_sessions_request_id_key UNIQUE (request_id),
    CONSTRAINT import_sessions_project_fkey FOREIGN KEY (project_id)
        REFERENCES session.projects (project_id),
    CONSTRAINT import_sessions_state_check CHECK (state IN
        ('created', 'running', 'paused', 'budget_exhausted',
         'completed', 'completed_with_errors', 'cancelled')),
    CONSTRAINT import_sessions_max_in_flight_check CHECK (max_in_flight > 0),
    CONSTRAINT import_sessions_budget_check CHECK (budget_limit IS NULL OR budget_limit >= 0)
);
CREATE INDEX import_sessions_state_idx ON session.import_sessions (state, created_at DESC);
CREATE INDEX import_sessions_project_idx ON session.import_sessions (project_id, created_at DESC);

CREATE TABLE session.session_documents (
    document_id      uuid           NOT NULL,
    session_id       uuid           NOT NULL,
    manifest_file_id uuid           NOT NULL,
    ordinal          integer        NOT NULL,
    dispatch_rank    integer        NOT NULL DEFAULT 0,
    relative_path    text           NOT NULL,
    raw_path         bytea          NOT NULL,
    sha256           text,
    size_bytes       bigint         NOT NULL DEFAULT 0,
    category         text           NOT NULL DEFAULT 'miscellaneous',
    priority         integer        NOT NULL DEFAULT 100,
    plan             text           NOT NULL,
    page_count       integer        NOT NULL DEFAULT 0,
    ocr_page_count   integer        NOT NULL DEFAULT 0,
    state            text           NOT NULL DEFAULT 'pending',
    stage            text,
    error_class      text,
    error_code       text,
    error_message    text,
    skip_reason      text,
    attempts         integer        NOT NULL DEFAULT 0,
    cost             numeric(24, 8) NOT NULL DEFAULT 0,
    not_before       timestamptz,
    created_at       timestamptz    NOT NULL DEFAULT now(),
    updated_at       timestamptz    NOT NULL DEFAULT now(),
    CONSTRAINT session_documents_pkey PRIMARY KEY (document_id),
    CONSTRAINT session_documents_session_fkey FOREIGN KEY (session_id)
        REFERENCES session.import_sessions (session_id) ON DELETE CASCADE,
    CONSTRAINT session_documents_file_key UNIQUE (session_id, manifest_file_id),
    CONSTRAINT session_documents_state_check CHECK (state IN
        ('pending', 'queued', 'running', 'completed', 'failed', 'skipped', 'cancelled')),
    CONSTRAINT session_documents_stage_check
        CHECK (stage IS NULL OR stage IN ('extract', 'chunk', 'entities')),
    CONSTRAINT session_documents_error_class_check
        CHECK (error_class IS NULL OR error_class IN ('retryable', 'permanent')),
    CONSTRAINT session_documents_failed_has_reason_check
        CHECK (state <> 'failed' OR (error_class IS NOT NULL AND error_message IS NOT NULL)),
    CONSTRAINT session_documents_skipped_has_reason_check
        CHECK (state <> 'skipped' OR skip_reason IS NOT NULL)
);
CREATE INDEX session_documents_pending_idx
    ON session.session_documents (session_id, dispatch_rank, ordinal)
    WHERE state = 'pending';
CREATE INDEX session_documents_state_idx ON session.session_documents (session_id, state);

CREATE TABLE session.stage_runs (
    document_id      uuid           NOT NULL,
    stage            text           NOT NULL,
    attempt          integer        NOT NULL,
    session_id       uuid           NOT NULL,
    state            text           NOT NULL DEFAULT 'queued',
    task_id          text           NOT NULL,
    worker           text,
    reservation_id   uuid,
    reserved_amount  numeric(24, 8),
    queued_at        timestamptz    NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    lease_expires_at timestamptz    NOT NULL,
    duration_seconds numeric(14, 6),
    error_class      text,
    error_code       text,
    error_message    text,
    artifacts        jsonb          NOT NULL DEFAULT '[]'::jsonb,
    cache_hit        boolean        NOT NULL DEFAULT false,
    cost             numeric(24, 8),
    stats            jsonb          NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT stage_runs_pkey PRIMARY KEY (document_id, stage, attempt),
    CONSTRAINT stage_runs_document_fkey FOREIGN KEY (document_id)
        REFERENCES session.session_documents (document_id) ON DELETE CASCADE,
    CONSTRAINT stage_runs_session_fkey FOREIGN KEY (session_id)
        REFERENCES session.import_sessions (session_id) ON DELETE CASCADE,
    CONSTRAINT stage_runs_task_id_key UNIQUE (task_id),
    CONSTRAINT stage_runs_stage_check CHECK (stage IN ('extract', 'chunk', 'entities')),
    CONSTRAINT stage_runs_state_check CHECK (state IN
        ('queued', 'running', 'succeeded', 'failed', 'expired', 'cancelled')),
    CONSTRAINT stage_runs_attempt_check CHECK (attempt >= 1),
    CONSTRAINT stage_runs_error_class_check
        CHECK (error_class IS NULL OR error_class IN ('retryable', 'permanent'))
);
CREATE INDEX stage_runs_lease_idx ON session.stage_runs (lease_expires_at)
    WHERE state IN ('queued', 'running');
CREATE INDEX stage_runs_session_idx ON session.stage_runs (session_id, state);
-- At most one live (queued or running) run per document: exactly-once.
CREATE UNIQUE INDEX stage_runs_one_live_key ON session.stage_runs (document_id)
    WHERE state IN ('queued', 'running');

CREATE TABLE session.session_events (
    session_id  uuid        NOT NULL,
    seq         bigint      NOT NULL,
    event_time  timestamptz NOT NULL DEFAULT now(),
    kind        text        NOT NULL,
    document_id uuid,
    payload     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT session_events_pkey PRIMARY KEY (session_id, seq),
    CONSTRAINT session_events_session_fkey FOREIGN KEY (session_id)
        REFERENCES session.import_sessions (session_id) ON DELETE CASCADE,
    CONSTRAINT session_events_kind_check CHECK (kind IN ('document', 'state_change')),
    CONSTRAINT session_events_seq_check CHECK (seq > 0)
);
