"""Prices a manifest's importable files by asking the cost service (EstimateCost).

Owns the manifest service's only outgoing call. No price lives here: each
importable file goes to the cost service as a FilePlan (plan, pages, OCR
pages, size) keyed by its ordinal; the answer is the per-file amounts, the
totals by service and by operation, and the price book version used.
Requests carry at most `BATCH` files; later batches pin the version the
first one got, and the totals are added up exactly (Decimal).

Unpriced manifests: when the cost service cannot answer (unreachable,
deadline exceeded, or any error), `price` returns a `Pricing` with no total
and a `note` saying why. The scan still finishes: the manifest is `ready`,
`estimated_total` is absent (never a misleading zero), and
`summary.pricing_note` tells the reader. Analyze again with a new request
id once the cost service is back to get a priced manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import grpc
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2, cost_service_pb2_grpc

from services.common import convert
from services.manifest.model import CostLine, ManifestFile, Pricing

logger = logging.getLogger(__name__)

BATCH = 50_000


class Pricer:
    """EstimateCost over a channel the caller owns."""

    def __init__(self, stub: cost_service_pb2_grpc.CostServiceStub | None, timeout: float = 30.0) -> None:
        self._stub = stub
        self._timeout = timeout

    async def price(self, files: Sequence[ManifestFile]) -> Pricing:
        """Prices the importable files of `files` (others cost nothing here)."""
        if self._stub is None:
            return Pricing(None, None, note="not priced: no cost service is configured")
        plans = [
            cost_service_pb2.FilePlan(
                key=str(f.ordinal), plan=convert.plan_value(f.plan), page_count=f.page_count,
                ocr_page_count=f.ocr_page_count, size_bytes=f.size_bytes,
            )
            for f in files if f.importable
        ]
        try:
            return await self._estimate(plans)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            logger.warning("manifest not priced: %s", reason)
            return Pricing(None, None, note=(
                f"not priced: the cost service did not answer ({reason}). Amounts are absent, "
                "not zero; analyze again with a new request id once it is reachable."))
        except (InvalidOperation, ValueError) as exc:
            logger.error("manifest not priced: malformed estimate (%s)", exc)
            return Pricing(None, None, note=f"not priced: the cost service sent a malformed estimate ({exc})")

    async def _estimate(self, plans: list[cost_service_pb2.FilePlan]) -> Pricing:
        assert self._stub is not None
        version = 0
        per_file: dict[int, Decimal] = {}
        total = Decimal(0)
        by_service: dict[str, list[Decimal]] = {}
        by_operation: dict[tuple[str, str], list[Decimal]] = {}
        start = 0
        while True:
            chunk = plans[start:start + BATCH]
            response = await self._stub.EstimateCost(
                cost_service_pb2.EstimateCostRequest(price_book_version=version, files=chunk),
                timeout=self._timeout,
            )
            version = response.price_book_version
            for estimate in response.files:
                per_file[int(estimate.key)] = _amount(estimate.amount)
            total += _amount(response.total)
            for line in response.by_service:
                _add(by_service, line.service or line.key, line)
            for line in response.by_operation:
                _add(by_operation, (line.service, line.operation or line.key), line)
            start += BATCH
            if start >= len(plans):
                break
        return Pricing(
            price_book_version=version,
            total=total,
            by_service=tuple(CostLine(k, "", _units(v[0]), v[1]) for k, v in sorted(by_service.items())),
            by_operation=tuple(CostLine(k[0], k[1], _units(v[0]), v[1])
                               for k, v in sorted(by_operation.items())),
            per_file=per_file,
        )


def _amount(money: common_pb2.Money) -> Decimal:
    if money.currency_code and money.currency_code != convert.CURRENCY:
        raise ValueError(f"unexpected currency {money.currency_code!r}")
    return Decimal(money.amount or "0")


def _add(groups: dict, key: object, line: cost_service_pb2.CostTotal) -> None:
    units = Decimal(line.units or "0")
    amount = _amount(line.amount)
    if key in groups:
        groups[key][0] += units
        groups[key][1] += amount
    else:
        groups[key] = [units, amount]


def _units(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"
