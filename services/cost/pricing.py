"""Price books, plan rules and the exact money arithmetic of the cost service.

Owns the domain of pricing, with no SQL, no protos and no I/O beyond parsing
text it is handed:

- `Price`, `PlanRule`, `PriceBook` (an immutable published version) and
  `PriceBookDraft` (a book not yet published), and their validation: every
  problem is reported as an `InvalidArgument` field violation naming where
  it is (`prices[3].unit_price`).
- The repository's TOML format (`parse_price_book_toml`, see
  `services/cost/pricebook.toml` for the documented default).
- Estimates: `price_line` and `estimate_file` turn (service, operation,
  units) and per-file plans into priced lines.
- The ledger's idempotency key and the event id derived from it (`event_id`).

Money rules: amounts are `Decimal`, never float. Unit prices and units carry
at most 8 fractional digits; an amount is the exact product units x unit
price (so at most 16 digits) computed in `EXACT`, a context that raises on
any rounding instead of rounding. Estimated *units* derived from a file's
size (`mb` basis) are rounded up to 8 digits, since an estimate of a quantity
is a forecast; no money amount is ever rounded here (only for display).
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
import tomllib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from services.common.convert import PLANS, STAGES
from services.common.errors import FieldViolation, InvalidArgument, quote
from services.common.validate import text_problem

# Raises (never rounds) if a product or sum would need more than 60 digits.
EXACT = decimal.Context(
    prec=60,
    rounding=decimal.ROUND_HALF_EVEN,
    traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow, decimal.DivisionByZero],
)
ZERO = Decimal(0)
PLACES = 8
QUANTUM = Decimal(1).scaleb(-PLACES)
# Bounds that keep every value inside its NUMERIC column.
MAX_UNIT_PRICE = Decimal(10) ** 6
MAX_UNITS = Decimal(10) ** 12
MAX_UNITS_PER = Decimal(10) ** 6

BASES = ("file", "page", "ocr_page", "text_page", "mb")
OCR_ENGINES = ("local", "aws_textract")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")
MAX_PRICES = 10_000
MAX_RULES = 10_000

# Namespace of ledger event ids: uuid5(EVENT_NAMESPACE, idempotency key).
EVENT_NAMESPACE = uuid.UUID("6f1c2a0e-5d1b-5b7e-9a43-0c05d0c1e7a1")


def times(a: Decimal, b: Decimal) -> Decimal:
    """a x b, exactly."""
    return EXACT.multiply(a, b)


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    """The exact sum of `values` (zero for none)."""
    total = ZERO
    for value in values:
        total = EXACT.add(total, value)
    return total


def places(value: Decimal) -> int:
    """Fractional digits of `value` once trailing zeros are dropped."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or exponent >= 0:
        return 0
    digits = value.as_tuple().digits
    trailing = 0
    for digit in reversed(digits):
        if digit != 0 or trailing >= -exponent:
            break
        trailing += 1
    return -exponent - trailing


def ceil_units(value: Decimal) -> Decimal:
    """`value` rounded up to 8 fractional digits (estimated quantities only)."""
    if places(value) <= PLACES:
        return value
    return value.quantize(QUANTUM, rounding=decimal.ROUND_CEILING, context=decimal.Context(prec=60))


@dataclass(frozen=True)
class Price:
    """The price of one unit of one operation of one service."""

    service: str
    operation: str
    unit: str
    unit_price: Decimal
    description: str = ""


@dataclass(frozen=True)
class PlanRule:
    """A plan at a stage costs `units_per` x `basis` of one priced operation."""

    plan: str
    stage: str
    service: str
    operation: str
    basis: str
    units_per: Decimal


@dataclass(frozen=True)
class PriceBookDraft:
    """A validated book, not yet published (it has no version)."""

    name: str
    description: str
    prices: tuple[Price, ...]
    plan_rules: tuple[PlanRule, ...]
    source_toml: str | None = None

    def with_price(self, service: str, operation: str, unit_price: Decimal) -> PriceBookDraft:
        """A copy with one price replaced (the configured CPU-second rate)."""
        prices = tuple(
            Price(p.service, p.operation, p.unit, unit_price, p.description)
            if (p.service, p.operation) == (service, operation)
            else p
            for p in self.prices
        )
        return PriceBookDraft(self.name, self.description, prices, self.plan_rules, self.source_toml)


@dataclass(frozen=True)
class PriceBook:
    """One published, immutable version of every price."""

    version: int
    name: str
    description: str
    published_at: dt.datetime
    prices: tuple[Price, ...]
    plan_rules: tuple[PlanRule, ...]
    _index: Mapping[tuple[str, str], Price] = field(init=False, repr=False, compare=False)
    _rules: Mapping[str, tuple[PlanRule, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {(p.service, p.operation): p for p in self.prices})
        by_plan: dict[str, list[PlanRule]] = {}
        for rule in self.plan_rules:
            by_plan.setdefault(rule.plan, []).append(rule)
        stage_order = {name: i for i, name in enumerate(STAGES)}
        object.__setattr__(
            self,
            "_rules",
            {
                plan: tuple(sorted(rules, key=lambda r: (stage_order[r.stage], r.service, r.operation, r.basis)))
                for plan, rules in by_plan.items()
            },
        )

    def price(self, service: str, operation: str) -> Price | None:
        return self._index.get((service, operation))

    def rules_for(self, plan: str) -> tuple[PlanRule, ...]:
        return self._rules.get(plan, ())


# ------------------------------------------------------------------ validation


def _decimal(value: Any, where: str, problems: list[FieldViolation], *,
             maximum: Decimal) -> Decimal | None:
    """A non-negative Decimal with <= 8 places from a string, int or Decimal."""
    if value is None or (isinstance(value, str) and not value.strip()):
        problems.append(FieldViolation(where, "is required"))
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        problems.append(FieldViolation(where, "must be a decimal number (a string or a TOML number)"))
        return None
    try:
        number = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except decimal.InvalidOperation:
        problems.append(FieldViolation(where, f"{quote(value)} is not a decimal number"))
        return None
    if not number.is_finite():
        problems.append(FieldViolation(where, f"{quote(value)} is not a finite number"))
    elif number < 0:
        problems.append(FieldViolation(where, "must not be negative"))
    elif number >= maximum:
        problems.append(FieldViolation(where, f"must be less than {maximum:,}"))
    elif places(number) > PLACES:
        problems.append(FieldViolation(where, f"has more than {PLACES} decimal places"))
    else:
        return number
    return None


def _name(value: Any, where: str, problems: list[FieldViolation]) -> str:
    if not isinstance(value, str) or not value:
        problems.append(FieldViolation(where, "is required"))
        return ""
    if not NAME_RE.match(value):
        problems.append(
            FieldViolation(where, f"{quote(value)}: use 1-64 lower-case letters, digits, '_', '.', '-'")
        )
    return value


def _choice(value: Any, where: str, allowed: Sequence[str], problems: list[FieldViolation]) -> str:
    if value not in allowed:
        problems.append(FieldViolation(where, f"{quote(value)} is not one of {', '.join(allowed)}"))
        return ""
    return str(value)


def build_draft(
    *,
    name: Any,
    description: Any,
    prices: Sequence[Mapping[str, Any]],
    plan_rules: Sequence[Mapping[str, Any]],
    source_toml: str | None = None,
    prefix: str = "",
    rule_paths: Sequence[str] | None = None,
) -> PriceBookDraft:
    """Validates raw fields into a draft; raises InvalidArgument listing every problem.

    `prices` items have service, operation, unit, unit_price, description;
    `plan_rules` items have plan, stage, service, operation, basis, units_per.
    """
    problems: list[FieldViolation] = []
    if not isinstance(name, str) or not name.strip():
        problems.append(FieldViolation(f"{prefix}name", "is required"))
        name = ""
    elif len(name) > 200:
        problems.append(FieldViolation(f"{prefix}name", "is longer than 200 characters"))
    else:
        _text(name, f"{prefix}name", problems)
    if not isinstance(description, str):
        problems.append(FieldViolation(f"{prefix}description", "must be text"))
        description = ""
    _text(description, f"{prefix}description", problems)
    if not prices:
        problems.append(FieldViolation(f"{prefix}prices", "a price book needs at least one price"))
    if len(prices) > MAX_PRICES:
        problems.append(FieldViolation(f"{prefix}prices", f"more than {MAX_PRICES} prices"))
    if len(plan_rules) > MAX_RULES:
        problems.append(FieldViolation(f"{prefix}plan_rules", f"more than {MAX_RULES} rules"))
    if problems and (len(prices) > MAX_PRICES or len(plan_rules) > MAX_RULES):
        raise InvalidArgument(violations=problems)

    built_prices: list[Price] = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(prices):
        where = f"{prefix}prices[{i}]"
        if not isinstance(raw, Mapping):
            problems.append(FieldViolation(where, "must be a table"))
            continue
        _unknown_keys(raw, {"service", "operation", "unit", "unit_price", "description"}, where, problems)
        service = _name(raw.get("service"), f"{where}.service", problems)
        operation = _name(raw.get("operation"), f"{where}.operation", problems)
        unit = _name(raw.get("unit"), f"{where}.unit", problems)
        unit_price = _decimal(raw.get("unit_price"), f"{where}.unit_price", problems,
                              maximum=MAX_UNIT_PRICE)
        text = raw.get("description", "")
        if not isinstance(text, str):
            problems.append(FieldViolation(f"{where}.description", "must be text"))
            text = ""
        _text(text, f"{where}.description", problems)
        if service and operation:
            if (service, operation) in seen:
                problems.append(FieldViolation(where, f"{service}/{operation} is priced twice"))
            seen.add((service, operation))
        if unit_price is not None:
            built_prices.append(Price(service, operation, unit, unit_price, text))

    built_rules: list[PlanRule] = []
    seen_rules: set[tuple[str, str, str, str, str]] = set()
    for i, raw in enumerate(plan_rules):
        where = rule_paths[i] if rule_paths else f"{prefix}plan_rules[{i}]"
        if not isinstance(raw, Mapping):
            problems.append(FieldViolation(where, "must be a table"))
            continue
        _unknown_keys(raw, {"plan", "stage", "service", "operation", "basis", "units_per"}, where, problems)
        plan = _choice(raw.get("plan"), f"{where}.plan", PLANS, problems)
        stage = _choice(raw.get("stage"), f"{where}.stage", STAGES, problems)
        basis = _choice(raw.get("basis"), f"{where}.basis", BASES, problems)
        service = _name(raw.get("service"), f"{where}.service", problems)
        operation = _name(raw.get("operation"), f"{where}.operation", problems)
        units_per = _decimal(raw.get("units_per"), f"{where}.units_per", problems,
                             maximum=MAX_UNITS_PER)
        if service and operation and (service, operation) not in seen:
            problems.append(
                FieldViolation(f"{where}.operation", f"{service}/{operation} has no price in this book")
            )
        key = (plan, stage, service, operation, basis)
        if all(key):
            if key in seen_rules:
                problems.append(FieldViolation(where, "the same rule appears twice"))
            seen_rules.add(key)
        if units_per is not None:
            built_rules.append(PlanRule(plan, stage, service, operation, basis, units_per))

    if problems:
        raise InvalidArgument(violations=problems[:100])
    return PriceBookDraft(name.strip(), description, tuple(built_prices), tuple(built_rules), source_toml)


def _text(value: str, where: str, problems: list[FieldViolation]) -> None:
    """The rules of every request's text (no NUL, a length cap), for text read from TOML."""
    problem = text_problem(value)
    if problem is not None:
        problems.append(FieldViolation(where, problem))


def _unknown_keys(raw: Mapping[str, Any], known: set[str], where: str,
                  problems: list[FieldViolation]) -> None:
    for key in raw:
        if key not in known:
            problems.append(FieldViolation(f"{where}.{key}", f"unknown key; expected {', '.join(sorted(known))}"))


def parse_price_book_toml(text: str, *, field_name: str = "toml") -> PriceBookDraft:
    """A draft from the repository's TOML format (see pricebook.toml).

    TOML numbers are read as Decimal, never float. Rules carrying
    `ocr = "<engine>"` apply only when the book's `ocr_engine` is that engine.
    """
    try:
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument.field(field_name, f"not valid TOML: {exc}") from None
    except RecursionError:
        raise InvalidArgument.field(field_name, "not valid TOML: nested too deeply") from None
    problems: list[FieldViolation] = []
    known = {"name", "description", "currency", "ocr_engine", "prices", "plan_rules"}
    for key in data:
        if key not in known:
            problems.append(FieldViolation(f"{field_name}.{key}", f"unknown key; expected {', '.join(sorted(known))}"))
    currency = data.get("currency", "USD")
    if currency != "USD":
        problems.append(FieldViolation(f"{field_name}.currency", f"only USD is supported, got {quote(currency)}"))
    engine = data.get("ocr_engine", "local")
    if engine not in OCR_ENGINES:
        problems.append(FieldViolation(f"{field_name}.ocr_engine", f"{quote(engine)} is not one of {', '.join(OCR_ENGINES)}"))
    prices = data.get("prices", [])
    if not isinstance(prices, list):
        problems.append(FieldViolation(f"{field_name}.prices", "must be an array of tables"))
        prices = []
    by_plan = data.get("plan_rules", {})
    if not isinstance(by_plan, Mapping):
        problems.append(FieldViolation(f"{field_name}.plan_rules", "must be a table keyed by plan"))
        by_plan = {}
    selected: list[Mapping[str, Any]] = []
    paths: list[str] = []
    for plan, rules in by_plan.items():
        where = f"{field_name}.plan_rules.{plan}"
        if plan not in PLANS:
            problems.append(FieldViolation(where, f"{plan!r} is not one of {', '.join(PLANS)}"))
            continue
        if not isinstance(rules, list):
            problems.append(FieldViolation(where, "must be an array of rules"))
            continue
        for i, rule in enumerate(rules):
            if not isinstance(rule, Mapping):
                problems.append(FieldViolation(f"{where}[{i}]", "must be a table"))
                continue
            if "plan" in rule:
                problems.append(FieldViolation(f"{where}[{i}].plan", "the plan is the table's key"))
                continue
            if "ocr" in rule:
                if rule["ocr"] not in OCR_ENGINES:
                    problems.append(FieldViolation(f"{where}[{i}].ocr",
                                                   f"{rule['ocr']!r} is not one of {', '.join(OCR_ENGINES)}"))
                if rule["ocr"] != engine:
                    continue
            selected.append({"plan": plan, **{k: v for k, v in rule.items() if k != "ocr"}})
            paths.append(f"{where}[{i}]")
    if problems:
        raise InvalidArgument(violations=problems)
    return build_draft(
        name=data.get("name", ""),
        description=data.get("description", ""),
        prices=prices,
        plan_rules=selected,
        source_toml=text,
        prefix=f"{field_name}.",
        rule_paths=paths,
    )


# ------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class PricedLine:
    """`units` of one operation at its unit price; amount = units x unit_price."""

    key: str
    service: str
    operation: str
    units: Decimal
    unit_price: Decimal
    amount: Decimal
    stage: str = ""


@dataclass(frozen=True)
class FileFacts:
    """What an estimate needs to know of one file."""

    key: str
    plan: str
    page_count: int
    ocr_page_count: int
    size_bytes: int


@dataclass(frozen=True)
class FileEstimate:
    key: str
    amount: Decimal
    lines: tuple[PricedLine, ...]


@dataclass(frozen=True)
class Total:
    """An amount grouped by (service[, operation])."""

    service: str
    operation: str
    units: Decimal
    amount: Decimal
    count: int


class UnknownPrice(LookupError):
    """The book has no price for a (service, operation)."""


def price_line(book: PriceBook, key: str, service: str, operation: str, units: Decimal,
               stage: str = "") -> PricedLine:
    price = book.price(service, operation)
    if price is None:
        raise UnknownPrice(f"price book version {book.version} has no price for {service}/{operation}")
    return PricedLine(key, service, operation, units, price.unit_price, times(units, price.unit_price), stage)


_MEGABYTE = Decimal(1_000_000)


def basis_count(basis: str, facts: FileFacts) -> Decimal:
    """How many basis units a file counts (exact; mb = bytes / 1,000,000)."""
    if basis == "file":
        return Decimal(1)
    if basis == "page":
        return Decimal(facts.page_count)
    if basis == "ocr_page":
        return Decimal(facts.ocr_page_count)
    if basis == "text_page":
        return Decimal(facts.page_count - facts.ocr_page_count)
    if basis == "mb":
        return EXACT.divide(Decimal(facts.size_bytes), _MEGABYTE)
    raise ValueError(f"unknown basis {basis!r}")


def estimate_file(book: PriceBook, facts: FileFacts) -> FileEstimate:
    """The priced lines of one file's plan, merged per (stage, service, operation)."""
    merged: dict[tuple[str, str, str], Decimal] = {}
    for rule in book.rules_for(facts.plan):
        units = times(basis_count(rule.basis, facts), rule.units_per)
        slot = (rule.stage, rule.service, rule.operation)
        merged[slot] = EXACT.add(merged.get(slot, ZERO), units)
    lines = []
    for (stage, service, operation), units in merged.items():
        if units == 0:
            continue
        lines.append(price_line(book, facts.key, service, operation, ceil_units(units), stage))
    return FileEstimate(facts.key, exact_sum(line.amount for line in lines), tuple(lines))


def totals(lines: Iterable[PricedLine], *, by_operation: bool) -> list[Total]:
    """Lines summed by service (or by service and operation), largest first."""
    groups: dict[tuple[str, str], list[Decimal | int]] = {}
    for line in lines:
        slot = (line.service, line.operation if by_operation else "")
        acc = groups.setdefault(slot, [ZERO, ZERO, 0])
        acc[0] = EXACT.add(acc[0], line.units)  # type: ignore[arg-type]
        acc[1] = EXACT.add(acc[1], line.amount)  # type: ignore[arg-type]
        acc[2] += 1  # type: ignore[operator]
    result = [Total(s, o, acc[0], acc[1], acc[2]) for (s, o), acc in groups.items()]  # type: ignore[arg-type]
    result.sort(key=lambda t: (-t.amount, t.service, t.operation))
    return result


# ---------------------------------------------------------------------- ledger


def event_id(session_id: uuid.UUID | str, document_id: uuid.UUID | str | None, stage: str, attempt: int,
             service: str, operation: str, kind: str) -> uuid.UUID:
    """The id of a ledger event, derived from its idempotency key.

    The key is (session, document, stage, attempt, service, operation, kind),
    ids in their canonical lower-case form; equal keys give equal ids, so a
    replay conflicts on the primary key.
    """
    key = f"{session_id}|{document_id or ''}|{stage}|{attempt}|{service}|{operation}|{kind}"
    return uuid.uuid5(EVENT_NAMESPACE, key)
