"""Conversions between domain values and their proto forms.

Owns the exact-money rule at the wire: `Money.amount` is a decimal string,
parsed with `Decimal`, never float; amounts keep up to 8 fractional digits
and are never rounded here (only `format_money` rounds, for display).
Also timestamps, durations, stage/plan enum names and opaque page tokens
(base64 JSON cursors; the typed getters refuse a crafted one's values, which
would otherwise reach Postgres out of range).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from decimal import Context, Decimal, InvalidOperation
from typing import Any

from docimport.common.v1 import common_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from services.common.errors import InvalidArgument, quote

CURRENCY = "USD"
MAX_PLACES = 8
# Digits of an exact ledger amount: units (8 places) x unit price (8 places).
LEDGER_PLACES = 16
# The largest money amount a request may carry (budgets, reservations,
# settlements, reported costs), exclusive: far below the range of the
# narrowest money column (session.import_sessions.budget_limit, numeric(24, 8):
# under 10^16), so sums of many still fit numeric(38, 16).
MAX_AMOUNT = Decimal(10) ** 15
# normalize() rounds to its context's precision (28 digits by default): a
# ledger sum of 13 integer and 16 fractional digits would come out rounded.
_WIDE = Context(prec=100)
ZERO = Decimal(0)

STAGES = ("extract", "chunk", "entities")
PLANS = ("text_layer", "ocr", "docx", "email", "image", "text", "unsupported")


def money(amount: Decimal | int | str | None, currency: str = CURRENCY) -> common_pb2.Money:
    """A Money message of an exact amount (None is zero)."""
    value = Decimal(amount) if amount is not None else ZERO
    return common_pb2.Money(currency_code=currency, amount=_plain(value))


def _plain(value: Decimal) -> str:
    text = format(value.normalize(_WIDE), "f") if value != 0 else "0"
    return text


def parse_money(message: common_pb2.Money, field: str, *, allow_negative: bool = False,
                places: int = MAX_PLACES) -> Decimal:
    """The Decimal of a Money message; INVALID_ARGUMENT naming `field` when malformed.

    `places` admits more fractional digits where an amount may be a ledger
    total (units x unit price: up to LEDGER_PLACES), so it round-trips exactly.
    """
    return parse_decimal(message.amount or "0", field, allow_negative=allow_negative,
                         currency=message.currency_code, places=places)


def parse_decimal(text: str, field: str, *, allow_negative: bool = False,
                  currency: str = CURRENCY, places: int = MAX_PLACES) -> Decimal:
    if currency and currency != CURRENCY:
        raise InvalidArgument.field(f"{field}.currency_code", f"only {CURRENCY} is supported, got {quote(currency)}")
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, AttributeError):
        raise InvalidArgument.field(field, f"{quote(text)} is not a decimal number") from None
    if not value.is_finite():
        raise InvalidArgument.field(field, f"{quote(text)} is not a finite number")
    if value < 0 and not allow_negative:
        raise InvalidArgument.field(field, "must not be negative")
    exponent = value.normalize(_WIDE).as_tuple().exponent
    if isinstance(exponent, int) and -exponent > places:
        raise InvalidArgument.field(field, f"has more than {places} decimal places")
    return value


def format_money(amount: Decimal | str, places: int = 2) -> str:
    """For display only: '$1,234.57' (amounts under a cent keep 4 places)."""
    value = Decimal(amount)
    if value != 0 and abs(value) < Decimal("0.01"):
        places = max(places, 4)
    quantum = Decimal(1).scaleb(-places)
    return f"${value.quantize(quantum):,}"


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC))
    return ts


def from_timestamp(ts: timestamp_pb2.Timestamp) -> dt.datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=dt.UTC)


def duration(seconds: float | Decimal | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(Decimal(seconds) * 1_000_000_000))
    return d


def stage_name(value: int) -> str:
    """'extract' for STAGE_EXTRACT; '' for unspecified."""
    if value == common_pb2.STAGE_UNSPECIFIED:
        return ""
    return common_pb2.Stage.Name(value).removeprefix("STAGE_").lower()


def stage_value(name: str | None) -> int:
    if not name:
        return common_pb2.STAGE_UNSPECIFIED
    return common_pb2.Stage.Value("STAGE_" + name.upper())


def plan_name(value: int) -> str:
    if value == common_pb2.PROCESSING_PLAN_UNSPECIFIED:
        return ""
    return common_pb2.ProcessingPlan.Name(value).removeprefix("PROCESSING_PLAN_").lower()


def plan_value(name: str | None) -> int:
    if not name:
        return common_pb2.PROCESSING_PLAN_UNSPECIFIED
    return common_pb2.ProcessingPlan.Value("PROCESSING_PLAN_" + name.upper())


def enum_name(enum_type: Any, value: int, prefix: str) -> str:
    """Lower-case name of a proto enum value without its prefix ('' for 0)."""
    if value == 0:
        return ""
    return enum_type.Name(value).removeprefix(prefix).lower()


def enum_value(enum_type: Any, name: str | None, prefix: str) -> int:
    if not name:
        return 0
    return enum_type.Value(prefix + name.upper())


DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(cursor: dict[str, Any]) -> str:
    """An opaque token for a keyset cursor."""
    raw = json.dumps(cursor, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _not_issued() -> InvalidArgument:
    return InvalidArgument.field("page_token", "is not a token this service issued")


def cursor_int(cursor: dict[str, Any], key: str, *, bits: int) -> int:
    """A non-negative integer of a decoded page token that fits the signed `bits` column
    it is compared with (INVALID_ARGUMENT otherwise)."""
    value = cursor.get(key)
    if type(value) is not int or not 0 <= value < 2 ** (bits - 1):
        raise _not_issued()
    return value


def cursor_time(cursor: dict[str, Any], key: str) -> dt.datetime:
    """A time of a decoded page token: ISO 8601 with an offset, within years 1 to 9999 in UTC."""
    try:
        value = dt.datetime.fromisoformat(cursor[key])
        if value.tzinfo is None:
            raise ValueError
        return value.astimezone(dt.UTC)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise _not_issued() from None


def cursor_uuid(cursor: dict[str, Any], key: str) -> uuid.UUID:
    try:
        return uuid.UUID(cursor[key])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _not_issued() from None


def decode_page_token(token: str) -> dict[str, Any] | None:
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        cursor = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, RecursionError):
        raise _not_issued() from None
    if not isinstance(cursor, dict):
        raise _not_issued()
    return cursor
