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

class ManifestState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MANIFEST_STATE_UNSPECIFIED: _ClassVar[ManifestState]
    MANIFEST_STATE_SCANNING: _ClassVar[ManifestState]
    MANIFEST_STATE_READY: _ClassVar[ManifestState]
    MANIFEST_STATE_FAILED: _ClassVar[ManifestState]
    MANIFEST_STATE_DELETED: _ClassVar[ManifestState]

class ProblemKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROBLEM_KIND_UNSPECIFIED: _ClassVar[ProblemKind]
    PROBLEM_KIND_EMPTY: _ClassVar[ProblemKind]
    PROBLEM_KIND_CORRUPT: _ClassVar[ProblemKind]
    PROBLEM_KIND_ENCRYPTED: _ClassVar[ProblemKind]
    PROBLEM_KIND_UNREADABLE: _ClassVar[ProblemKind]
    PROBLEM_KIND_UNSUPPORTED: _ClassVar[ProblemKind]
    PROBLEM_KIND_TOO_LARGE: _ClassVar[ProblemKind]
    PROBLEM_KIND_NOT_A_FILE: _ClassVar[ProblemKind]

class ScanPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCAN_PHASE_UNSPECIFIED: _ClassVar[ScanPhase]
    SCAN_PHASE_WALKING: _ClassVar[ScanPhase]
    SCAN_PHASE_HASHING: _ClassVar[ScanPhase]
    SCAN_PHASE_PRICING: _ClassVar[ScanPhase]
    SCAN_PHASE_SAVING: _ClassVar[ScanPhase]
    SCAN_PHASE_DONE: _ClassVar[ScanPhase]
MANIFEST_STATE_UNSPECIFIED: ManifestState
MANIFEST_STATE_SCANNING: ManifestState
MANIFEST_STATE_READY: ManifestState
MANIFEST_STATE_FAILED: ManifestState
MANIFEST_STATE_DELETED: ManifestState
PROBLEM_KIND_UNSPECIFIED: ProblemKind
PROBLEM_KIND_EMPTY: ProblemKind
PROBLEM_KIND_CORRUPT: ProblemKind
PROBLEM_KIND_ENCRYPTED: ProblemKind
PROBLEM_KIND_UNREADABLE: ProblemKind
PROBLEM_KIND_UNSUPPORTED: ProblemKind
PROBLEM_KIND_TOO_LARGE: ProblemKind
PROBLEM_KIND_NOT_A_FILE: ProblemKind
SCAN_PHASE_UNSPECIFIED: ScanPhase
SCAN_PHASE_WALKING: ScanPhase
SCAN_PHASE_HASHING: ScanPhase
SCAN_PHASE_PRICING: ScanPhase
SCAN_PHASE_SAVING: ScanPhase
SCAN_PHASE_DONE: ScanPhase

class AnalyzeSourceRequest(_message.Message):
    __slots__ = ("request_id", "source_path", "case_name", "exclude_types", "exclude_globs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PATH_FIELD_NUMBER: _ClassVar[int]
    CASE_NAME_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_TYPES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_GLOBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    source_path: str
    case_name: str
    exclude_types: _containers.RepeatedScalarFieldContainer[str]
    exclude_globs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., source_path: _Optional[str] = ..., case_name: _Optional[str] = ..., exclude_types: _Optional[_Iterable[str]] = ..., exclude_globs: _Optional[_Iterable[str]] = ...) -> None: ...

class ScanProgress(_message.Message):
    __slots__ = ("phase", "files_seen", "files_done", "bytes_total", "bytes_hashed", "current_path", "files_per_second", "bytes_per_second", "eta")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FILES_SEEN_FIELD_NUMBER: _ClassVar[int]
    FILES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_HASHED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PATH_FIELD_NUMBER: _ClassVar[int]
    FILES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    phase: ScanPhase
    files_seen: int
    files_done: int
    bytes_total: int
    bytes_hashed: int
    current_path: str
    files_per_second: float
    bytes_per_second: float
    eta: _duration_pb2.Duration
    def __init__(self, phase: _Optional[_Union[ScanPhase, str]] = ..., files_seen: _Optional[int] = ..., files_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bytes_hashed: _Optional[int] = ..., current_path: _Optional[str] = ..., files_per_second: _Optional[float] = ..., bytes_per_second: _Optional[float] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AnalyzeSourceResponse(_message.Message):
    __slots__ = ("progress", "manifest")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    progress: ScanProgress
    manifest: Manifest
    def __init__(self, progress: _Optional[_Union[ScanProgress, _Mapping]] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class Count(_message.Message):
    __slots__ = ("key", "files", "bytes", "pages")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    key: str
    files: int
    bytes: int
    pages: int
    def __init__(self, key: _Optional[str] = ..., files: _Optional[int] = ..., bytes: _Optional[int] = ..., pages: _Optional[int] = ...) -> None: ...

class CostLine(_message.Message):
    __slots__ = ("service", "operation", "units", "amount")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    service: str
    operation: str
    units: str
    amount: _common_pb2.Money
    def __init__(self, service: _Optional[str] = ..., operation: _Optional[str] = ..., units: _Optional[str] = ..., amount: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class ManifestSummary(_message.Message):
    __slots__ = ("file_count", "total_bytes", "importable_count", "duplicate_count", "problem_count", "excluded_count", "page_count", "ocr_page_count", "by_type", "by_category", "by_problem", "by_plan", "estimated_total", "estimated_by_service", "estimated_by_operation", "price_book_version", "attachment_count", "pricing_note")
    FILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMPORTABLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    OCR_PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    BY_TYPE_FIELD_NUMBER: _ClassVar[int]
    BY_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    BY_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    BY_PLAN_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BY_SERVICE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BY_OPERATION_FIELD_NUMBER: _ClassVar[int]
    PRICE_BOOK_VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    PRICING_NOTE_FIELD_NUMBER: _ClassVar[int]
    file_count: int
    total_bytes: int
    importable_count: int
    duplicate_count: int
    problem_count: int
    excluded_count: int
    page_count: int
    ocr_page_count: int
    by_type: _containers.RepeatedCompositeFieldContainer[Count]
    by_category: _containers.RepeatedCompositeFieldContainer[Count]
    by_problem: _containers.RepeatedCompositeFieldContainer[Count]
    by_plan: _containers.RepeatedCompositeFieldContainer[Count]
    estimated_total: _common_pb2.Money
    estimated_by_service: _containers.RepeatedCompositeFieldContainer[CostLine]
    estimated_by_operation: _containers.RepeatedCompositeFieldContainer[CostLine]
    price_book_version: int
    attachment_count: int
    pricing_note: str
    def __init__(self, file_count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., importable_count: _Optional[int] = ..., duplicate_count: _Optional[int] = ..., problem_count: _Optional[int] = ..., excluded_count: _Optional[int] = ..., page_count: _Optional[int] = ..., ocr_page_count: _Optional[int] = ..., by_type: _Optional[_Iterable[_Union[Count, _Mapping]]] = ..., by_category: _Optional[_Iterable[_Union[Count, _Mapping]]] = ..., by_problem: _Optional[_Iterable[_Union[Count, _Mapping]]] = ..., by_plan: _Optional[_Iterable[_Union[Count, _Mapping]]] = ..., estimated_total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., estimated_by_service: _Optional[_Iterable[_Union[CostLine, _Mapping]]] = ..., estimated_by_operation: _Optional[_Iterable[_Union[CostLine, _Mapping]]] = ..., price_book_version: _Optional[int] = ..., attachment_count: _Optional[int] = ..., pricing_note: _Optional[str] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("manifest_id", "case_name", "source_path", "state", "created_at", "summary", "request_id", "error", "schema_version")
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PATH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    manifest_id: str
    case_name: str
    source_path: str
    state: ManifestState
    created_at: _timestamp_pb2.Timestamp
    summary: ManifestSummary
    request_id: str
    error: str
    schema_version: int
    def __init__(self, manifest_id: _Optional[str] = ..., case_name: _Optional[str] = ..., source_path: _Optional[str] = ..., state: _Optional[_Union[ManifestState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., summary: _Optional[_Union[ManifestSummary, _Mapping]] = ..., request_id: _Optional[str] = ..., error: _Optional[str] = ..., schema_version: _Optional[int] = ...) -> None: ...

class FileProblem(_message.Message):
    __slots__ = ("kind", "message")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: ProblemKind
    message: str
    def __init__(self, kind: _Optional[_Union[ProblemKind, str]] = ..., message: _Optional[str] = ...) -> None: ...

class ManifestFile(_message.Message):
    __slots__ = ("file_id", "manifest_id", "relative_path", "raw_path", "size_bytes", "modified_at", "sha256", "mime_type", "extension_mismatch", "type_family", "category", "priority", "plan", "page_count", "ocr_page_count", "problem", "duplicate_of_file_id", "duplicate_of_path", "exclusion_reason", "family_parent_file_id", "estimated_cost", "importable")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_PATH_FIELD_NUMBER: _ClassVar[int]
    RAW_PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODIFIED_AT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXTENSION_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    TYPE_FAMILY_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    OCR_PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_OF_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_OF_PATH_FIELD_NUMBER: _ClassVar[int]
    EXCLUSION_REASON_FIELD_NUMBER: _ClassVar[int]
    FAMILY_PARENT_FILE_ID_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_FIELD_NUMBER: _ClassVar[int]
    IMPORTABLE_FIELD_NUMBER: _ClassVar[int]
    file_id: str
    manifest_id: str
    relative_path: str
    raw_path: bytes
    size_bytes: int
    modified_at: _timestamp_pb2.Timestamp
    sha256: str
    mime_type: str
    extension_mismatch: bool
    type_family: str
    category: str
    priority: int
    plan: _common_pb2.ProcessingPlan
    page_count: int
    ocr_page_count: int
    problem: FileProblem
    duplicate_of_file_id: str
    duplicate_of_path: str
    exclusion_reason: str
    family_parent_file_id: str
    estimated_cost: _common_pb2.Money
    importable: bool
    def __init__(self, file_id: _Optional[str] = ..., manifest_id: _Optional[str] = ..., relative_path: _Optional[str] = ..., raw_path: _Optional[bytes] = ..., size_bytes: _Optional[int] = ..., modified_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sha256: _Optional[str] = ..., mime_type: _Optional[str] = ..., extension_mismatch: _Optional[bool] = ..., type_family: _Optional[str] = ..., category: _Optional[str] = ..., priority: _Optional[int] = ..., plan: _Optional[_Union[_common_pb2.ProcessingPlan, str]] = ..., page_count: _Optional[int] = ..., ocr_page_count: _Optional[int] = ..., problem: _Optional[_Union[FileProblem, _Mapping]] = ..., duplicate_of_file_id: _Optional[str] = ..., duplicate_of_path: _Optional[str] = ..., exclusion_reason: _Optional[str] = ..., family_parent_file_id: _Optional[str] = ..., estimated_cost: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., importable: _Optional[bool] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("manifest_id",)
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    manifest_id: str
    def __init__(self, manifest_id: _Optional[str] = ...) -> None: ...

class GetManifestResponse(_message.Message):
    __slots__ = ("manifest",)
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class ListManifestsRequest(_message.Message):
    __slots__ = ("case_name", "page_size", "page_token")
    CASE_NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    case_name: str
    page_size: int
    page_token: str
    def __init__(self, case_name: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListManifestsResponse(_message.Message):
    __slots__ = ("manifests", "next_page_token")
    MANIFESTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    manifests: _containers.RepeatedCompositeFieldContainer[Manifest]
    next_page_token: str
    def __init__(self, manifests: _Optional[_Iterable[_Union[Manifest, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListManifestFilesRequest(_message.Message):
    __slots__ = ("manifest_id", "category", "type_family", "duplicate", "has_problem", "excluded", "problem", "importable", "page_size", "page_token")
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TYPE_FAMILY_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    HAS_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    IMPORTABLE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    manifest_id: str
    category: str
    type_family: str
    duplicate: bool
    has_problem: bool
    excluded: bool
    problem: ProblemKind
    importable: bool
    page_size: int
    page_token: str
    def __init__(self, manifest_id: _Optional[str] = ..., category: _Optional[str] = ..., type_family: _Optional[str] = ..., duplicate: _Optional[bool] = ..., has_problem: _Optional[bool] = ..., excluded: _Optional[bool] = ..., problem: _Optional[_Union[ProblemKind, str]] = ..., importable: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListManifestFilesResponse(_message.Message):
    __slots__ = ("files", "next_page_token", "total_size")
    FILES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[ManifestFile]
    next_page_token: str
    total_size: int
    def __init__(self, files: _Optional[_Iterable[_Union[ManifestFile, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class DeleteManifestRequest(_message.Message):
    __slots__ = ("manifest_id",)
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    manifest_id: str
    def __init__(self, manifest_id: _Optional[str] = ...) -> None: ...

class DeleteManifestResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportManifestRequest(_message.Message):
    __slots__ = ("manifest_id",)
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    manifest_id: str
    def __init__(self, manifest_id: _Optional[str] = ...) -> None: ...

class ExportManifestResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ImportManifestRequest(_message.Message):
    __slots__ = ("request_id", "manifest_json", "source_path")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PATH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    manifest_json: bytes
    source_path: str
    def __init__(self, request_id: _Optional[str] = ..., manifest_json: _Optional[bytes] = ..., source_path: _Optional[str] = ...) -> None: ...

class Discrepancy(_message.Message):
    __slots__ = ("relative_path", "message")
    RELATIVE_PATH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    relative_path: str
    message: str
    def __init__(self, relative_path: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ImportManifestResponse(_message.Message):
    __slots__ = ("manifest", "discrepancies")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DISCREPANCIES_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    discrepancies: _containers.RepeatedCompositeFieldContainer[Discrepancy]
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ..., discrepancies: _Optional[_Iterable[_Union[Discrepancy, _Mapping]]] = ...) -> None: ...
