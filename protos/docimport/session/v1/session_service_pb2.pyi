import datetime

from docimport.common.v1 import common_pb2 as _common_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_CREATED: _ClassVar[SessionState]
    SESSION_STATE_RUNNING: _ClassVar[SessionState]
    SESSION_STATE_PAUSED: _ClassVar[SessionState]
    SESSION_STATE_BUDGET_EXHAUSTED: _ClassVar[SessionState]
    SESSION_STATE_COMPLETED: _ClassVar[SessionState]
    SESSION_STATE_COMPLETED_WITH_ERRORS: _ClassVar[SessionState]
    SESSION_STATE_CANCELLED: _ClassVar[SessionState]

class DocumentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DOCUMENT_STATE_UNSPECIFIED: _ClassVar[DocumentState]
    DOCUMENT_STATE_PENDING: _ClassVar[DocumentState]
    DOCUMENT_STATE_QUEUED: _ClassVar[DocumentState]
    DOCUMENT_STATE_RUNNING: _ClassVar[DocumentState]
    DOCUMENT_STATE_COMPLETED: _ClassVar[DocumentState]
    DOCUMENT_STATE_FAILED: _ClassVar[DocumentState]
    DOCUMENT_STATE_SKIPPED: _ClassVar[DocumentState]
    DOCUMENT_STATE_CANCELLED: _ClassVar[DocumentState]

class ErrorClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CLASS_UNSPECIFIED: _ClassVar[ErrorClass]
    ERROR_CLASS_RETRYABLE: _ClassVar[ErrorClass]
    ERROR_CLASS_PERMANENT: _ClassVar[ErrorClass]

class StageRunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_RUN_STATE_UNSPECIFIED: _ClassVar[StageRunState]
    STAGE_RUN_STATE_QUEUED: _ClassVar[StageRunState]
    STAGE_RUN_STATE_RUNNING: _ClassVar[StageRunState]
    STAGE_RUN_STATE_SUCCEEDED: _ClassVar[StageRunState]
    STAGE_RUN_STATE_FAILED: _ClassVar[StageRunState]
    STAGE_RUN_STATE_EXPIRED: _ClassVar[StageRunState]
    STAGE_RUN_STATE_CANCELLED: _ClassVar[StageRunState]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_PASS: _ClassVar[Verdict]
    VERDICT_WARN: _ClassVar[Verdict]
    VERDICT_FAIL: _ClassVar[Verdict]

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_INFO: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_ERROR: _ClassVar[Severity]
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_CREATED: SessionState
SESSION_STATE_RUNNING: SessionState
SESSION_STATE_PAUSED: SessionState
SESSION_STATE_BUDGET_EXHAUSTED: SessionState
SESSION_STATE_COMPLETED: SessionState
SESSION_STATE_COMPLETED_WITH_ERRORS: SessionState
SESSION_STATE_CANCELLED: SessionState
DOCUMENT_STATE_UNSPECIFIED: DocumentState
DOCUMENT_STATE_PENDING: DocumentState
DOCUMENT_STATE_QUEUED: DocumentState
DOCUMENT_STATE_RUNNING: DocumentState
DOCUMENT_STATE_COMPLETED: DocumentState
DOCUMENT_STATE_FAILED: DocumentState
DOCUMENT_STATE_SKIPPED: DocumentState
DOCUMENT_STATE_CANCELLED: DocumentState
ERROR_CLASS_UNSPECIFIED: ErrorClass
ERROR_CLASS_RETRYABLE: ErrorClass
ERROR_CLASS_PERMANENT: ErrorClass
STAGE_RUN_STATE_UNSPECIFIED: StageRunState
STAGE_RUN_STATE_QUEUED: StageRunState
STAGE_RUN_STATE_RUNNING: StageRunState
STAGE_RUN_STATE_SUCCEEDED: StageRunState
STAGE_RUN_STATE_FAILED: StageRunState
STAGE_RUN_STATE_EXPIRED: StageRunState
STAGE_RUN_STATE_CANCELLED: StageRunState
VERDICT_UNSPECIFIED: Verdict
VERDICT_PASS: Verdict
VERDICT_WARN: Verdict
VERDICT_FAIL: Verdict
SEVERITY_UNSPECIFIED: Severity
SEVERITY_INFO: Severity
SEVERITY_WARNING: Severity
SEVERITY_ERROR: Severity

class Project(_message.Message):
    __slots__ = ("project_id", "name", "created_at")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    name: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, project_id: _Optional[str] = ..., name: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SessionOptions(_message.Message):
    __slots__ = ("budget", "max_in_flight", "category_priority", "dry_run")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    budget: _common_pb2.Money
    max_in_flight: int
    category_priority: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    def __init__(self, budget: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., max_in_flight: _Optional[int] = ..., category_priority: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class DocumentCounts(_message.Message):
    __slots__ = ("total", "pending", "queued", "running", "completed", "failed", "skipped", "cancelled", "stalled")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    STALLED_FIELD_NUMBER: _ClassVar[int]
    total: int
    pending: int
    queued: int
    running: int
    completed: int
    failed: int
    skipped: int
    cancelled: int
    stalled: int
    def __init__(self, total: _Optional[int] = ..., pending: _Optional[int] = ..., queued: _Optional[int] = ..., running: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., skipped: _Optional[int] = ..., cancelled: _Optional[int] = ..., stalled: _Optional[int] = ...) -> None: ...

class StageCounts(_message.Message):
    __slots__ = ("stage", "queued", "running", "succeeded", "failed", "cache_hits")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    stage: _common_pb2.Stage
    queued: int
    running: int
    succeeded: int
    failed: int
    cache_hits: int
    def __init__(self, stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., queued: _Optional[int] = ..., running: _Optional[int] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., cache_hits: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "project", "manifest_id", "state", "options", "counts", "stages", "documents_per_second", "eta", "cost_so_far", "estimated_cost", "created_at", "started_at", "finished_at", "request_id", "last_seq", "state_reason", "wasted_cost")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    COST_SO_FAR_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    WASTED_COST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    project: Project
    manifest_id: str
    state: SessionState
    options: SessionOptions
    counts: DocumentCounts
    stages: _containers.RepeatedCompositeFieldContainer[StageCounts]
    documents_per_second: float
    eta: _duration_pb2.Duration
    cost_so_far: _common_pb2.Money
    estimated_cost: _common_pb2.Money
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    request_id: str
    last_seq: int
    state_reason: str
    wasted_cost: _common_pb2.Money
    def __init__(self, session_id: _Optional[str] = ..., project: _Optional[_Union[Project, _Mapping]] = ..., manifest_id: _Optional[str] = ..., state: _Optional[_Union[SessionState, str]] = ..., options: _Optional[_Union[SessionOptions, _Mapping]] = ..., counts: _Optional[_Union[DocumentCounts, _Mapping]] = ..., stages: _Optional[_Iterable[_Union[StageCounts, _Mapping]]] = ..., documents_per_second: _Optional[float] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cost_so_far: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., estimated_cost: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., last_seq: _Optional[int] = ..., state_reason: _Optional[str] = ..., wasted_cost: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("kind", "uri", "sha256", "size_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    uri: str
    sha256: str
    size_bytes: int
    def __init__(self, kind: _Optional[str] = ..., uri: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class StageRun(_message.Message):
    __slots__ = ("stage", "attempt", "state", "task_id", "worker", "queued_at", "started_at", "finished_at", "lease_expires_at", "duration", "error_class", "error_code", "error_message", "artifacts", "cache_hit", "cost")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    QUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    stage: _common_pb2.Stage
    attempt: int
    state: StageRunState
    task_id: str
    worker: str
    queued_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    lease_expires_at: _timestamp_pb2.Timestamp
    duration: _duration_pb2.Duration
    error_class: ErrorClass
    error_code: str
    error_message: str
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    cache_hit: bool
    cost: _common_pb2.Money
    def __init__(self, stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., attempt: _Optional[int] = ..., state: _Optional[_Union[StageRunState, str]] = ..., task_id: _Optional[str] = ..., worker: _Optional[str] = ..., queued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error_class: _Optional[_Union[ErrorClass, str]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., cache_hit: _Optional[bool] = ..., cost: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("document_id", "session_id", "manifest_file_id", "relative_path", "sha256", "size_bytes", "category", "priority", "plan", "state", "stage", "error_class", "error_message", "skip_reason", "attempts", "stalled", "cost", "updated_at", "page_count", "stage_runs")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SKIP_REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    STALLED_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    STAGE_RUNS_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    session_id: str
    manifest_file_id: str
    relative_path: str
    sha256: str
    size_bytes: int
    category: str
    priority: int
    plan: _common_pb2.ProcessingPlan
    state: DocumentState
    stage: _common_pb2.Stage
    error_class: ErrorClass
    error_message: str
    skip_reason: str
    attempts: int
    stalled: bool
    cost: _common_pb2.Money
    updated_at: _timestamp_pb2.Timestamp
    page_count: int
    stage_runs: _containers.RepeatedCompositeFieldContainer[StageRun]
    def __init__(self, document_id: _Optional[str] = ..., session_id: _Optional[str] = ..., manifest_file_id: _Optional[str] = ..., relative_path: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., category: _Optional[str] = ..., priority: _Optional[int] = ..., plan: _Optional[_Union[_common_pb2.ProcessingPlan, str]] = ..., state: _Optional[_Union[DocumentState, str]] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., error_class: _Optional[_Union[ErrorClass, str]] = ..., error_message: _Optional[str] = ..., skip_reason: _Optional[str] = ..., attempts: _Optional[int] = ..., stalled: _Optional[bool] = ..., cost: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_count: _Optional[int] = ..., stage_runs: _Optional[_Iterable[_Union[StageRun, _Mapping]]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("request_id", "manifest_id", "project_name", "project_id", "options", "start")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_NAME_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    manifest_id: str
    project_name: str
    project_id: str
    options: SessionOptions
    start: bool
    def __init__(self, request_id: _Optional[str] = ..., manifest_id: _Optional[str] = ..., project_name: _Optional[str] = ..., project_id: _Optional[str] = ..., options: _Optional[_Union[SessionOptions, _Mapping]] = ..., start: _Optional[bool] = ...) -> None: ...

class DryRunPlan(_message.Message):
    __slots__ = ("documents", "skipped", "estimated_cost", "categories", "within_budget", "problem_files")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    WITHIN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FILES_FIELD_NUMBER: _ClassVar[int]
    documents: int
    skipped: int
    estimated_cost: _common_pb2.Money
    categories: _containers.RepeatedCompositeFieldContainer[CategoryPlan]
    within_budget: bool
    problem_files: int
    def __init__(self, documents: _Optional[int] = ..., skipped: _Optional[int] = ..., estimated_cost: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., categories: _Optional[_Iterable[_Union[CategoryPlan, _Mapping]]] = ..., within_budget: _Optional[bool] = ..., problem_files: _Optional[int] = ...) -> None: ...

class CategoryPlan(_message.Message):
    __slots__ = ("category", "documents")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    category: str
    documents: int
    def __init__(self, category: _Optional[str] = ..., documents: _Optional[int] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session", "plan")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    session: Session
    plan: DryRunPlan
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., plan: _Optional[_Union[DryRunPlan, _Mapping]] = ...) -> None: ...

class StartSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class StartSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class PauseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class PauseSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ResumeSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ResumeSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class CancelSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CancelSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("state", "project_name", "created_after", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROJECT_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: SessionState
    project_name: str
    created_after: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[SessionState, str]] = ..., project_name: _Optional[str] = ..., created_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListSessionDocumentsRequest(_message.Message):
    __slots__ = ("session_id", "state", "stage", "error_class", "category", "stalled", "page_size", "page_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    STALLED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state: DocumentState
    stage: _common_pb2.Stage
    error_class: ErrorClass
    category: str
    stalled: bool
    page_size: int
    page_token: str
    def __init__(self, session_id: _Optional[str] = ..., state: _Optional[_Union[DocumentState, str]] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., error_class: _Optional[_Union[ErrorClass, str]] = ..., category: _Optional[str] = ..., stalled: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionDocumentsResponse(_message.Message):
    __slots__ = ("documents", "next_page_token")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    next_page_token: str
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetDocumentRequest(_message.Message):
    __slots__ = ("document_id",)
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    def __init__(self, document_id: _Optional[str] = ...) -> None: ...

class GetDocumentResponse(_message.Message):
    __slots__ = ("document",)
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    document: Document
    def __init__(self, document: _Optional[_Union[Document, _Mapping]] = ...) -> None: ...

class RetryDocumentsRequest(_message.Message):
    __slots__ = ("session_id", "failed", "stalled", "document_ids", "force")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    STALLED_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    failed: bool
    stalled: bool
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    force: bool
    def __init__(self, session_id: _Optional[str] = ..., failed: _Optional[bool] = ..., stalled: _Optional[bool] = ..., document_ids: _Optional[_Iterable[str]] = ..., force: _Optional[bool] = ...) -> None: ...

class RetryDocumentsResponse(_message.Message):
    __slots__ = ("retried", "session")
    RETRIED_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    retried: int
    session: Session
    def __init__(self, retried: _Optional[int] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class WatchSessionRequest(_message.Message):
    __slots__ = ("session_id", "resume_after_seq", "heartbeat_interval", "resume_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resume_after_seq: int
    heartbeat_interval: _duration_pb2.Duration
    resume_token: str
    def __init__(self, session_id: _Optional[str] = ..., resume_after_seq: _Optional[int] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., resume_token: _Optional[str] = ...) -> None: ...

class DocumentEvent(_message.Message):
    __slots__ = ("document_id", "relative_path", "state", "stage", "error_class", "error_message", "cache_hit", "cost", "previous_state", "previous_stage", "attempt")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_PATH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    relative_path: str
    state: DocumentState
    stage: _common_pb2.Stage
    error_class: ErrorClass
    error_message: str
    cache_hit: bool
    cost: _common_pb2.Money
    previous_state: DocumentState
    previous_stage: _common_pb2.Stage
    attempt: int
    def __init__(self, document_id: _Optional[str] = ..., relative_path: _Optional[str] = ..., state: _Optional[_Union[DocumentState, str]] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., error_class: _Optional[_Union[ErrorClass, str]] = ..., error_message: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., cost: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., previous_state: _Optional[_Union[DocumentState, str]] = ..., previous_stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., attempt: _Optional[int] = ...) -> None: ...

class SessionStateChange(_message.Message):
    __slots__ = ("state", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: SessionState
    reason: str
    def __init__(self, state: _Optional[_Union[SessionState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchSessionResponse(_message.Message):
    __slots__ = ("seq", "event_time", "snapshot", "document", "state_change", "heartbeat", "resume_token")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    seq: int
    event_time: _timestamp_pb2.Timestamp
    snapshot: Session
    document: DocumentEvent
    state_change: SessionStateChange
    heartbeat: Heartbeat
    resume_token: str
    def __init__(self, seq: _Optional[int] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., snapshot: _Optional[_Union[Session, _Mapping]] = ..., document: _Optional[_Union[DocumentEvent, _Mapping]] = ..., state_change: _Optional[_Union[SessionStateChange, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., resume_token: _Optional[str] = ...) -> None: ...

class ReportStageStartedRequest(_message.Message):
    __slots__ = ("document_id", "stage", "attempt", "task_id", "worker", "started_at")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    stage: _common_pb2.Stage
    attempt: int
    task_id: str
    worker: str
    started_at: _timestamp_pb2.Timestamp
    def __init__(self, document_id: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., attempt: _Optional[int] = ..., task_id: _Optional[str] = ..., worker: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportStageStartedResponse(_message.Message):
    __slots__ = ("proceed", "lease_expires_at")
    PROCEED_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    proceed: bool
    lease_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, proceed: _Optional[bool] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StageStats(_message.Message):
    __slots__ = ("pages", "ocr_pages", "characters", "chunks", "entities")
    PAGES_FIELD_NUMBER: _ClassVar[int]
    OCR_PAGES_FIELD_NUMBER: _ClassVar[int]
    CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    pages: int
    ocr_pages: int
    characters: int
    chunks: int
    entities: int
    def __init__(self, pages: _Optional[int] = ..., ocr_pages: _Optional[int] = ..., characters: _Optional[int] = ..., chunks: _Optional[int] = ..., entities: _Optional[int] = ...) -> None: ...

class ReportStageResultRequest(_message.Message):
    __slots__ = ("document_id", "stage", "attempt", "task_id", "worker", "succeeded", "error_class", "error_code", "error_message", "artifacts", "cache_hit", "duration", "cost", "stats")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    stage: _common_pb2.Stage
    attempt: int
    task_id: str
    worker: str
    succeeded: bool
    error_class: ErrorClass
    error_code: str
    error_message: str
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    cache_hit: bool
    duration: _duration_pb2.Duration
    cost: _common_pb2.Money
    stats: StageStats
    def __init__(self, document_id: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., attempt: _Optional[int] = ..., task_id: _Optional[str] = ..., worker: _Optional[str] = ..., succeeded: _Optional[bool] = ..., error_class: _Optional[_Union[ErrorClass, str]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., cache_hit: _Optional[bool] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., stats: _Optional[_Union[StageStats, _Mapping]] = ...) -> None: ...

class ReportStageResultResponse(_message.Message):
    __slots__ = ("replayed", "document_state")
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_STATE_FIELD_NUMBER: _ClassVar[int]
    replayed: bool
    document_state: DocumentState
    def __init__(self, replayed: _Optional[bool] = ..., document_state: _Optional[_Union[DocumentState, str]] = ...) -> None: ...

class ReportStageResultsRequest(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[ReportStageResultRequest]
    def __init__(self, reports: _Optional[_Iterable[_Union[ReportStageResultRequest, _Mapping]]] = ...) -> None: ...

class ReportStageResultsResponse(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[StageResultAnswer]
    def __init__(self, answers: _Optional[_Iterable[_Union[StageResultAnswer, _Mapping]]] = ...) -> None: ...

class StageResultAnswer(_message.Message):
    __slots__ = ("code", "message", "result")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    result: ReportStageResultResponse
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., result: _Optional[_Union[ReportStageResultResponse, _Mapping]] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("severity", "code", "message", "count", "document_ids")
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    severity: Severity
    code: str
    message: str
    count: int
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, severity: _Optional[_Union[Severity, str]] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., count: _Optional[int] = ..., document_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class VerifySessionRequest(_message.Message):
    __slots__ = ("session_id", "deep")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DEEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    deep: bool
    def __init__(self, session_id: _Optional[str] = ..., deep: _Optional[bool] = ...) -> None: ...

class VerifyCounts(_message.Message):
    __slots__ = ("manifest_files", "completed", "skipped", "failed", "unaccounted", "in_progress")
    MANIFEST_FILES_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    UNACCOUNTED_FIELD_NUMBER: _ClassVar[int]
    IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    manifest_files: int
    completed: int
    skipped: int
    failed: int
    unaccounted: int
    in_progress: int
    def __init__(self, manifest_files: _Optional[int] = ..., completed: _Optional[int] = ..., skipped: _Optional[int] = ..., failed: _Optional[int] = ..., unaccounted: _Optional[int] = ..., in_progress: _Optional[int] = ...) -> None: ...

class VerifySessionResponse(_message.Message):
    __slots__ = ("session_id", "verdict", "counts", "findings", "recommendations", "completeness_percent", "actual_cost", "estimated_cost")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    COMPLETENESS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_COST_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    verdict: Verdict
    counts: VerifyCounts
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    recommendations: _containers.RepeatedScalarFieldContainer[str]
    completeness_percent: float
    actual_cost: _common_pb2.Money
    estimated_cost: _common_pb2.Money
    def __init__(self, session_id: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., counts: _Optional[_Union[VerifyCounts, _Mapping]] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., recommendations: _Optional[_Iterable[str]] = ..., completeness_percent: _Optional[float] = ..., actual_cost: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., estimated_cost: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class GetPipelineOverviewRequest(_message.Message):
    __slots__ = ("stall_after", "finished_within", "failure_limit", "stalled_limit")
    STALL_AFTER_FIELD_NUMBER: _ClassVar[int]
    FINISHED_WITHIN_FIELD_NUMBER: _ClassVar[int]
    FAILURE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    STALLED_LIMIT_FIELD_NUMBER: _ClassVar[int]
    stall_after: _duration_pb2.Duration
    finished_within: _duration_pb2.Duration
    failure_limit: int
    stalled_limit: int
    def __init__(self, stall_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., finished_within: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., failure_limit: _Optional[int] = ..., stalled_limit: _Optional[int] = ...) -> None: ...

class QueueDepth(_message.Message):
    __slots__ = ("queue", "stage", "messages")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    queue: str
    stage: _common_pb2.Stage
    messages: int
    def __init__(self, queue: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., messages: _Optional[int] = ...) -> None: ...

class PipelineWorker(_message.Message):
    __slots__ = ("hostname", "queues")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hostname: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ...) -> None: ...

class BrokerStatus(_message.Message):
    __slots__ = ("reachable", "error", "workers_checked_at")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKERS_CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    error: str
    workers_checked_at: _timestamp_pb2.Timestamp
    def __init__(self, reachable: _Optional[bool] = ..., error: _Optional[str] = ..., workers_checked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StageWindowStats(_message.Message):
    __slots__ = ("stage", "window", "finished", "succeeded", "failed", "expired", "cache_hits", "runs_per_second", "p50_duration", "p95_duration", "error_rate")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    RUNS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    P50_DURATION_FIELD_NUMBER: _ClassVar[int]
    P95_DURATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    stage: _common_pb2.Stage
    window: _duration_pb2.Duration
    finished: int
    succeeded: int
    failed: int
    expired: int
    cache_hits: int
    runs_per_second: float
    p50_duration: _duration_pb2.Duration
    p95_duration: _duration_pb2.Duration
    error_rate: float
    def __init__(self, stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., finished: _Optional[int] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., expired: _Optional[int] = ..., cache_hits: _Optional[int] = ..., runs_per_second: _Optional[float] = ..., p50_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., p95_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error_rate: _Optional[float] = ...) -> None: ...

class GetPipelineOverviewResponse(_message.Message):
    __slots__ = ("generated_at", "sessions", "queues", "workers", "broker", "stage_stats", "stall_after", "stalled_total", "stalled_documents", "recent_failures")
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BROKER_FIELD_NUMBER: _ClassVar[int]
    STAGE_STATS_FIELD_NUMBER: _ClassVar[int]
    STALL_AFTER_FIELD_NUMBER: _ClassVar[int]
    STALLED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STALLED_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    RECENT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    generated_at: _timestamp_pb2.Timestamp
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    queues: _containers.RepeatedCompositeFieldContainer[QueueDepth]
    workers: _containers.RepeatedCompositeFieldContainer[PipelineWorker]
    broker: BrokerStatus
    stage_stats: _containers.RepeatedCompositeFieldContainer[StageWindowStats]
    stall_after: _duration_pb2.Duration
    stalled_total: int
    stalled_documents: _containers.RepeatedCompositeFieldContainer[Document]
    recent_failures: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, generated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., queues: _Optional[_Iterable[_Union[QueueDepth, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[PipelineWorker, _Mapping]]] = ..., broker: _Optional[_Union[BrokerStatus, _Mapping]] = ..., stage_stats: _Optional[_Iterable[_Union[StageWindowStats, _Mapping]]] = ..., stall_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., stalled_total: _Optional[int] = ..., stalled_documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., recent_failures: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...
