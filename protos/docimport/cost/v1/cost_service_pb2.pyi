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

class CostKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COST_KIND_UNSPECIFIED: _ClassVar[CostKind]
    COST_KIND_ESTIMATE: _ClassVar[CostKind]
    COST_KIND_ACTUAL: _ClassVar[CostKind]

class ReservationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESERVATION_STATE_UNSPECIFIED: _ClassVar[ReservationState]
    RESERVATION_STATE_OPEN: _ClassVar[ReservationState]
    RESERVATION_STATE_SETTLED: _ClassVar[ReservationState]
    RESERVATION_STATE_RELEASED: _ClassVar[ReservationState]
    RESERVATION_STATE_EXPIRED: _ClassVar[ReservationState]
COST_KIND_UNSPECIFIED: CostKind
COST_KIND_ESTIMATE: CostKind
COST_KIND_ACTUAL: CostKind
RESERVATION_STATE_UNSPECIFIED: ReservationState
RESERVATION_STATE_OPEN: ReservationState
RESERVATION_STATE_SETTLED: ReservationState
RESERVATION_STATE_RELEASED: ReservationState
RESERVATION_STATE_EXPIRED: ReservationState

class Price(_message.Message):
    __slots__ = ("service", "operation", "unit", "unit_price", "description")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    service: str
    operation: str
    unit: str
    unit_price: _common_pb2.Money
    description: str
    def __init__(self, service: _Optional[str] = ..., operation: _Optional[str] = ..., unit: _Optional[str] = ..., unit_price: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., description: _Optional[str] = ...) -> None: ...

class PriceBook(_message.Message):
    __slots__ = ("version", "name", "description", "published_at", "prices", "plan_rules")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PRICES_FIELD_NUMBER: _ClassVar[int]
    PLAN_RULES_FIELD_NUMBER: _ClassVar[int]
    version: int
    name: str
    description: str
    published_at: _timestamp_pb2.Timestamp
    prices: _containers.RepeatedCompositeFieldContainer[Price]
    plan_rules: _containers.RepeatedCompositeFieldContainer[PlanRule]
    def __init__(self, version: _Optional[int] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., prices: _Optional[_Iterable[_Union[Price, _Mapping]]] = ..., plan_rules: _Optional[_Iterable[_Union[PlanRule, _Mapping]]] = ...) -> None: ...

class PlanRule(_message.Message):
    __slots__ = ("plan", "stage", "service", "operation", "basis", "units_per")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    UNITS_PER_FIELD_NUMBER: _ClassVar[int]
    plan: _common_pb2.ProcessingPlan
    stage: _common_pb2.Stage
    service: str
    operation: str
    basis: str
    units_per: str
    def __init__(self, plan: _Optional[_Union[_common_pb2.ProcessingPlan, str]] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., service: _Optional[str] = ..., operation: _Optional[str] = ..., basis: _Optional[str] = ..., units_per: _Optional[str] = ...) -> None: ...

class GetPriceBookRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class GetPriceBookResponse(_message.Message):
    __slots__ = ("price_book",)
    PRICE_BOOK_FIELD_NUMBER: _ClassVar[int]
    price_book: PriceBook
    def __init__(self, price_book: _Optional[_Union[PriceBook, _Mapping]] = ...) -> None: ...

class ListPriceBooksRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPriceBooksResponse(_message.Message):
    __slots__ = ("price_books", "next_page_token")
    PRICE_BOOKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    price_books: _containers.RepeatedCompositeFieldContainer[PriceBook]
    next_page_token: str
    def __init__(self, price_books: _Optional[_Iterable[_Union[PriceBook, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class PublishPriceBookRequest(_message.Message):
    __slots__ = ("request_id", "price_book", "toml")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRICE_BOOK_FIELD_NUMBER: _ClassVar[int]
    TOML_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    price_book: PriceBook
    toml: str
    def __init__(self, request_id: _Optional[str] = ..., price_book: _Optional[_Union[PriceBook, _Mapping]] = ..., toml: _Optional[str] = ...) -> None: ...

class PublishPriceBookResponse(_message.Message):
    __slots__ = ("price_book",)
    PRICE_BOOK_FIELD_NUMBER: _ClassVar[int]
    price_book: PriceBook
    def __init__(self, price_book: _Optional[_Union[PriceBook, _Mapping]] = ...) -> None: ...

class EstimateLine(_message.Message):
    __slots__ = ("key", "service", "operation", "units")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    key: str
    service: str
    operation: str
    units: str
    def __init__(self, key: _Optional[str] = ..., service: _Optional[str] = ..., operation: _Optional[str] = ..., units: _Optional[str] = ...) -> None: ...

class FilePlan(_message.Message):
    __slots__ = ("key", "plan", "page_count", "ocr_page_count", "size_bytes")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    OCR_PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    key: str
    plan: _common_pb2.ProcessingPlan
    page_count: int
    ocr_page_count: int
    size_bytes: int
    def __init__(self, key: _Optional[str] = ..., plan: _Optional[_Union[_common_pb2.ProcessingPlan, str]] = ..., page_count: _Optional[int] = ..., ocr_page_count: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class EstimateCostRequest(_message.Message):
    __slots__ = ("price_book_version", "lines", "files")
    PRICE_BOOK_VERSION_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    price_book_version: int
    lines: _containers.RepeatedCompositeFieldContainer[EstimateLine]
    files: _containers.RepeatedCompositeFieldContainer[FilePlan]
    def __init__(self, price_book_version: _Optional[int] = ..., lines: _Optional[_Iterable[_Union[EstimateLine, _Mapping]]] = ..., files: _Optional[_Iterable[_Union[FilePlan, _Mapping]]] = ...) -> None: ...

class PricedLine(_message.Message):
    __slots__ = ("key", "service", "operation", "units", "unit_price", "amount", "stage")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    key: str
    service: str
    operation: str
    units: str
    unit_price: _common_pb2.Money
    amount: _common_pb2.Money
    stage: _common_pb2.Stage
    def __init__(self, key: _Optional[str] = ..., service: _Optional[str] = ..., operation: _Optional[str] = ..., units: _Optional[str] = ..., unit_price: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., amount: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ...) -> None: ...

class FileEstimate(_message.Message):
    __slots__ = ("key", "amount", "lines")
    KEY_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    key: str
    amount: _common_pb2.Money
    lines: _containers.RepeatedCompositeFieldContainer[PricedLine]
    def __init__(self, key: _Optional[str] = ..., amount: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., lines: _Optional[_Iterable[_Union[PricedLine, _Mapping]]] = ...) -> None: ...

class CostTotal(_message.Message):
    __slots__ = ("key", "service", "operation", "stage", "units", "amount", "event_count")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    key: str
    service: str
    operation: str
    stage: _common_pb2.Stage
    units: str
    amount: _common_pb2.Money
    event_count: int
    def __init__(self, key: _Optional[str] = ..., service: _Optional[str] = ..., operation: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., units: _Optional[str] = ..., amount: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., event_count: _Optional[int] = ...) -> None: ...

class EstimateCostResponse(_message.Message):
    __slots__ = ("price_book_version", "lines", "files", "total", "by_service", "by_operation")
    PRICE_BOOK_VERSION_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    BY_SERVICE_FIELD_NUMBER: _ClassVar[int]
    BY_OPERATION_FIELD_NUMBER: _ClassVar[int]
    price_book_version: int
    lines: _containers.RepeatedCompositeFieldContainer[PricedLine]
    files: _containers.RepeatedCompositeFieldContainer[FileEstimate]
    total: _common_pb2.Money
    by_service: _containers.RepeatedCompositeFieldContainer[CostTotal]
    by_operation: _containers.RepeatedCompositeFieldContainer[CostTotal]
    def __init__(self, price_book_version: _Optional[int] = ..., lines: _Optional[_Iterable[_Union[PricedLine, _Mapping]]] = ..., files: _Optional[_Iterable[_Union[FileEstimate, _Mapping]]] = ..., total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., by_service: _Optional[_Iterable[_Union[CostTotal, _Mapping]]] = ..., by_operation: _Optional[_Iterable[_Union[CostTotal, _Mapping]]] = ...) -> None: ...

class CostEvent(_message.Message):
    __slots__ = ("event_id", "session_id", "document_id", "stage", "attempt", "service", "operation", "units", "kind", "category", "cache_hit", "unit_price", "amount", "saved", "price_book_version", "occurred_at", "recorded_at", "grant")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    SAVED_FIELD_NUMBER: _ClassVar[int]
    PRICE_BOOK_VERSION_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    session_id: str
    document_id: str
    stage: _common_pb2.Stage
    attempt: int
    service: str
    operation: str
    units: str
    kind: CostKind
    category: str
    cache_hit: bool
    unit_price: _common_pb2.Money
    amount: _common_pb2.Money
    saved: _common_pb2.Money
    price_book_version: int
    occurred_at: _timestamp_pb2.Timestamp
    recorded_at: _timestamp_pb2.Timestamp
    grant: str
    def __init__(self, event_id: _Optional[str] = ..., session_id: _Optional[str] = ..., document_id: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., attempt: _Optional[int] = ..., service: _Optional[str] = ..., operation: _Optional[str] = ..., units: _Optional[str] = ..., kind: _Optional[_Union[CostKind, str]] = ..., category: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., unit_price: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., amount: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., saved: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., price_book_version: _Optional[int] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., grant: _Optional[str] = ...) -> None: ...

class RecordCostsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[CostEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[CostEvent, _Mapping]]] = ...) -> None: ...

class RecordCostsResponse(_message.Message):
    __slots__ = ("events", "replayed_count", "total")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[CostEvent]
    replayed_count: int
    total: _common_pb2.Money
    def __init__(self, events: _Optional[_Iterable[_Union[CostEvent, _Mapping]]] = ..., replayed_count: _Optional[int] = ..., total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class GetSessionCostsRequest(_message.Message):
    __slots__ = ("session_id", "top_documents", "totals_only")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOTALS_ONLY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    top_documents: int
    totals_only: bool
    def __init__(self, session_id: _Optional[str] = ..., top_documents: _Optional[int] = ..., totals_only: _Optional[bool] = ...) -> None: ...

class DocumentCost(_message.Message):
    __slots__ = ("document_id", "category", "amount")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    category: str
    amount: _common_pb2.Money
    def __init__(self, document_id: _Optional[str] = ..., category: _Optional[str] = ..., amount: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class GetSessionCostsResponse(_message.Message):
    __slots__ = ("session_id", "actual_total", "estimate_total", "by_service", "by_operation", "by_stage", "by_category", "top_documents", "cache_savings", "cache_hits", "event_count", "price_book_versions", "estimate_by_service")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BY_SERVICE_FIELD_NUMBER: _ClassVar[int]
    BY_OPERATION_FIELD_NUMBER: _ClassVar[int]
    BY_STAGE_FIELD_NUMBER: _ClassVar[int]
    BY_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TOP_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SAVINGS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    PRICE_BOOK_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_BY_SERVICE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    actual_total: _common_pb2.Money
    estimate_total: _common_pb2.Money
    by_service: _containers.RepeatedCompositeFieldContainer[CostTotal]
    by_operation: _containers.RepeatedCompositeFieldContainer[CostTotal]
    by_stage: _containers.RepeatedCompositeFieldContainer[CostTotal]
    by_category: _containers.RepeatedCompositeFieldContainer[CostTotal]
    top_documents: _containers.RepeatedCompositeFieldContainer[DocumentCost]
    cache_savings: _common_pb2.Money
    cache_hits: int
    event_count: int
    price_book_versions: _containers.RepeatedScalarFieldContainer[int]
    estimate_by_service: _containers.RepeatedCompositeFieldContainer[CostTotal]
    def __init__(self, session_id: _Optional[str] = ..., actual_total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., estimate_total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., by_service: _Optional[_Iterable[_Union[CostTotal, _Mapping]]] = ..., by_operation: _Optional[_Iterable[_Union[CostTotal, _Mapping]]] = ..., by_stage: _Optional[_Iterable[_Union[CostTotal, _Mapping]]] = ..., by_category: _Optional[_Iterable[_Union[CostTotal, _Mapping]]] = ..., top_documents: _Optional[_Iterable[_Union[DocumentCost, _Mapping]]] = ..., cache_savings: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., cache_hits: _Optional[int] = ..., event_count: _Optional[int] = ..., price_book_versions: _Optional[_Iterable[int]] = ..., estimate_by_service: _Optional[_Iterable[_Union[CostTotal, _Mapping]]] = ...) -> None: ...

class ListCostEventsRequest(_message.Message):
    __slots__ = ("session_id", "document_id", "stage", "kind", "service", "page_size", "page_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    document_id: str
    stage: _common_pb2.Stage
    kind: CostKind
    service: str
    page_size: int
    page_token: str
    def __init__(self, session_id: _Optional[str] = ..., document_id: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., kind: _Optional[_Union[CostKind, str]] = ..., service: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCostEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[CostEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[CostEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("session_id", "limit", "reserved", "spent", "remaining", "overrun", "updated_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    OVERRUN_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    limit: _common_pb2.Money
    reserved: _common_pb2.Money
    spent: _common_pb2.Money
    remaining: _common_pb2.Money
    overrun: _common_pb2.Money
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, session_id: _Optional[str] = ..., limit: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., reserved: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., spent: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., remaining: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., overrun: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("reservation_id", "session_id", "key", "amount", "actual", "state", "expires_at")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    session_id: str
    key: str
    amount: _common_pb2.Money
    actual: _common_pb2.Money
    state: ReservationState
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, reservation_id: _Optional[str] = ..., session_id: _Optional[str] = ..., key: _Optional[str] = ..., amount: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., actual: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., state: _Optional[_Union[ReservationState, str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("session_id", "limit")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    limit: _common_pb2.Money
    def __init__(self, session_id: _Optional[str] = ..., limit: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class SetBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class ReservationItem(_message.Message):
    __slots__ = ("key", "amount", "document_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    key: str
    amount: _common_pb2.Money
    document_id: str
    def __init__(self, key: _Optional[str] = ..., amount: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., document_id: _Optional[str] = ...) -> None: ...

class ReserveBudgetRequest(_message.Message):
    __slots__ = ("session_id", "items", "ttl", "allow_partial")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    items: _containers.RepeatedCompositeFieldContainer[ReservationItem]
    ttl: _duration_pb2.Duration
    allow_partial: bool
    def __init__(self, session_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ReservationItem, _Mapping]]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., allow_partial: _Optional[bool] = ...) -> None: ...

class ReserveBudgetResponse(_message.Message):
    __slots__ = ("reservations", "budget", "exhausted")
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    reservations: _containers.RepeatedCompositeFieldContainer[Reservation]
    budget: Budget
    exhausted: bool
    def __init__(self, reservations: _Optional[_Iterable[_Union[Reservation, _Mapping]]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., exhausted: _Optional[bool] = ...) -> None: ...

class Settlement(_message.Message):
    __slots__ = ("reservation_id", "actual")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    actual: _common_pb2.Money
    def __init__(self, reservation_id: _Optional[str] = ..., actual: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class SettleReservationRequest(_message.Message):
    __slots__ = ("settlements",)
    SETTLEMENTS_FIELD_NUMBER: _ClassVar[int]
    settlements: _containers.RepeatedCompositeFieldContainer[Settlement]
    def __init__(self, settlements: _Optional[_Iterable[_Union[Settlement, _Mapping]]] = ...) -> None: ...

class SettleReservationResponse(_message.Message):
    __slots__ = ("reservations", "budget")
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    reservations: _containers.RepeatedCompositeFieldContainer[Reservation]
    budget: Budget
    def __init__(self, reservations: _Optional[_Iterable[_Union[Reservation, _Mapping]]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class ReleaseReservationRequest(_message.Message):
    __slots__ = ("reservation_ids",)
    RESERVATION_IDS_FIELD_NUMBER: _ClassVar[int]
    reservation_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, reservation_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseReservationResponse(_message.Message):
    __slots__ = ("reservations", "budget")
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    reservations: _containers.RepeatedCompositeFieldContainer[Reservation]
    budget: Budget
    def __init__(self, reservations: _Optional[_Iterable[_Union[Reservation, _Mapping]]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class WatchCostsRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class WatchCostsResponse(_message.Message):
    __slots__ = ("session_id", "actual_total", "estimate_total", "event_count", "budget", "observed_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    actual_total: _common_pb2.Money
    estimate_total: _common_pb2.Money
    event_count: int
    budget: Budget
    observed_at: _timestamp_pb2.Timestamp
    def __init__(self, session_id: _Optional[str] = ..., actual_total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., estimate_total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., event_count: _Optional[int] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., observed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
