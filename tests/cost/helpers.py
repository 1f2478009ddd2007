"""Builders shared by the cost service tests."""

from __future__ import annotations

import uuid
from decimal import Decimal

import grpc
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2 as pb
from google.rpc import error_details_pb2

from services.common.errors import details_of


def new_id() -> str:
    return str(uuid.uuid4())


def usd(amount: str | Decimal | int) -> common_pb2.Money:
    return common_pb2.Money(currency_code="USD", amount=str(amount))


def event(
    session_id: str,
    *,
    document_id: str = "",
    stage: int = common_pb2.STAGE_EXTRACT,
    attempt: int = 1,
    service: str = "aws_textract",
    operation: str = "ocr_page",
    units: str = "1",
    kind: int = pb.COST_KIND_ACTUAL,
    category: str = "",
    cache_hit: bool = False,
    price_book_version: int = 0,
) -> pb.CostEvent:
    return pb.CostEvent(
        session_id=session_id, document_id=document_id, stage=stage, attempt=attempt,
        service=service, operation=operation, units=units, kind=kind, category=category,
        cache_hit=cache_hit, price_book_version=price_book_version,
    )


def granted(e: pb.CostEvent, token: str = "sv-test-token", until: float | None = None
            ) -> pb.CostEvent:
    """`e` with the grant the session service (holding `token`) gives its run."""
    import time

    from services.common import convert, grants

    e.grant = grants.sign(grants.grant_key(token), e.session_id, e.document_id,
                          convert.stage_name(e.stage), e.attempt,
                          time.time() + 3600 if until is None else until)
    return e


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """Field -> description of an INVALID_ARGUMENT's BadRequest detail."""
    found: dict[str, str] = {}
    for bad in details_of(error, error_details_pb2.BadRequest):
        for v in bad.field_violations:
            found[v.field] = v.description
    return found


def dec(money: common_pb2.Money) -> Decimal:
    return Decimal(money.amount)
