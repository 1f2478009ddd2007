from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_EXTRACT: _ClassVar[Stage]
    STAGE_CHUNK: _ClassVar[Stage]
    STAGE_ENTITIES: _ClassVar[Stage]

class ProcessingPlan(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROCESSING_PLAN_UNSPECIFIED: _ClassVar[ProcessingPlan]
    PROCESSING_PLAN_TEXT_LAYER: _ClassVar[ProcessingPlan]
    PROCESSING_PLAN_OCR: _ClassVar[ProcessingPlan]
    PROCESSING_PLAN_DOCX: _ClassVar[ProcessingPlan]
    PROCESSING_PLAN_EMAIL: _ClassVar[ProcessingPlan]
    PROCESSING_PLAN_IMAGE: _ClassVar[ProcessingPlan]
    PROCESSING_PLAN_TEXT: _ClassVar[ProcessingPlan]
    PROCESSING_PLAN_UNSUPPORTED: _ClassVar[ProcessingPlan]
STAGE_UNSPECIFIED: Stage
STAGE_EXTRACT: Stage
STAGE_CHUNK: Stage
STAGE_ENTITIES: Stage
PROCESSING_PLAN_UNSPECIFIED: ProcessingPlan
PROCESSING_PLAN_TEXT_LAYER: ProcessingPlan
PROCESSING_PLAN_OCR: ProcessingPlan
PROCESSING_PLAN_DOCX: ProcessingPlan
PROCESSING_PLAN_EMAIL: ProcessingPlan
PROCESSING_PLAN_IMAGE: ProcessingPlan
PROCESSING_PLAN_TEXT: ProcessingPlan
PROCESSING_PLAN_UNSUPPORTED: ProcessingPlan

class Money(_message.Message):
    __slots__ = ("currency_code", "amount")
    CURRENCY_CODE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    currency_code: str
    amount: str
    def __init__(self, currency_code: _Optional[str] = ..., amount: _Optional[str] = ...) -> None: ...
