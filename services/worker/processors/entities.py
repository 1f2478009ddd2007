"""The entities stage's recognisers: citations, dates, money, case numbers, e-mails, phones.

Owns finding entities in extracted text, each as {type, text, start, end}
with Python string offsets into that text (`text[start:end]` is the
entity's text) plus a `normalized` value where one is useful:

- citation: eyecite (offline; reporters-db ships inside its wheel) - full
  case citations with their span from the case name to the year, statutes,
  journals, short forms, id. and supra; eyecite's bare "§" guesses are not
  kept. Line breaks are replaced by spaces first (same length, so offsets
  hold) because PDF text breaks citations across lines.
- case_number: federal docket numbers like 2:24-cv-01234 (with judge
  initials), and other numbers right after "Case No."/"Docket No."/"Index
  No."; the span is the number itself.
- money: $250,000.00, USD 1,200 - normalised as an exact decimal string,
  never a float.
- date: "March 14, 2024", "Mar. 14, 2024", "14 March 2024", 03/15/2024,
  2024-03-14 - normalised to ISO 8601 when valid.
- email, phone: the usual North American forms, (215) 555-0143,
  215-555-0143, +1 215 555 0143.

Where spans overlap, the earlier type in `PRIORITY` wins (a citation keeps
its year; a docket number is not also a phone number).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import re
from decimal import Decimal, InvalidOperation
from typing import Any

NAME = "entities"
VERSION = "1"

PRIORITY = ("citation", "case_number", "email", "money", "date", "phone")

_MONTHS = {
    name: number
    for number, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ],
        start=1,
    )
    for name in names
}
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)

_PATTERNS: dict[str, re.Pattern[str]] = {
    "case_number": re.compile(
        r"\b(?P<v>\d{1,2}:\d{2}-(?:cv|cr|mc|mj|bk|ap|md|po|sw|misc)-\d{3,6}(?:-[A-Z]{2,4}){0,3})\b"
        r"|\b(?:Case|Docket|Civil Action|Index) No\.?\s*(?P<w>[A-Z0-9][A-Z0-9:-]*\d)\b",
        re.IGNORECASE,
    ),
    "email": re.compile(
        r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+\b"
    ),
    "money": re.compile(
        r"(?:\$|USD\s?|US\$)\s?\d{1,3}(?:,\d{3})+(?:\.\d{1,2})?(?!\d)"
        r"|(?:\$|USD\s?|US\$)\s?\d+(?:\.\d{1,2})?(?![\d,])"
    ),
    "date_mdy": re.compile(rf"\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,\s*\d{{4}}\b"),
    "date_dmy": re.compile(rf"\b\d{{1,2}}\s+{_MONTH}\.?,?\s+\d{{4}}\b"),
    "date_num": re.compile(r"\b(?:\d{1,2}/\d{1,2}/\d{4}|\d{4}-\d{2}-\d{2})\b"),
    "phone": re.compile(
        r"(?<![\d/-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\d-])"
    ),
}


def eyecite_version() -> str:
    try:
        return importlib.metadata.version("eyecite")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _money(text: str) -> str | None:
    digits = re.sub(r"[^\d.]", "", text)
    try:
        return str(Decimal(digits))
    except InvalidOperation:
        return None


def _date(kind: str, text: str) -> str | None:
    try:
        if kind == "date_num":
            if "-" in text:
                return dt.date.fromisoformat(text).isoformat()
            month, day, year = (int(p) for p in text.split("/"))
            return dt.date(year, month, day).isoformat()
        words = re.findall(r"[A-Za-z]+|\d+", text)
        numbers = [int(w) for w in words if w.isdigit()]
        month = next(_MONTHS[w.lower()] for w in words if w.lower() in _MONTHS)
        day, year = (numbers[0], numbers[1]) if kind in ("date_mdy", "date_dmy") else (0, 0)
        return dt.date(year, month, day).isoformat()
    except (ValueError, StopIteration, IndexError):
        return None


def _citations(flat: str) -> list[dict[str, Any]]:
    from eyecite import get_citations
    from eyecite.models import FullCaseCitation, UnknownCitation

    found = []
    for citation in get_citations(flat):
        if isinstance(citation, UnknownCitation):
            continue
        start, end = (
            citation.full_span() if isinstance(citation, FullCaseCitation) else citation.span()
        )
        entity: dict[str, Any] = {
            "type": "citation",
            "subtype": type(citation).__name__.removesuffix("Citation").lower() or "citation",
            "start": start,
            "end": end,
            "normalized": citation.corrected_citation(),
        }
        metadata = getattr(citation, "metadata", None)
        for key in ("plaintiff", "defendant", "year", "court"):
            value = getattr(metadata, key, None) if metadata is not None else None
            if value:
                entity[key] = str(value)
        found.append(entity)
    return found


def find_entities(text: str) -> list[dict[str, Any]]:
    """Every entity in `text`, ordered by start offset."""
    flat = text.replace("\n", " ").replace("\f", " ")
    candidates = _citations(flat)
    for kind, pattern in _PATTERNS.items():
        for match in pattern.finditer(flat):
            entity_type = "date" if kind.startswith("date") else kind
            group = next((g for g in ("v", "w") if g in pattern.groupindex and match.group(g)), 0)
            start, end = match.span(group)
            entity: dict[str, Any] = {"type": entity_type, "start": start, "end": end}
            value = match.group(group)
            if entity_type == "money":
                entity["normalized"] = _money(value)
            elif entity_type == "date":
                entity["normalized"] = _date(kind, value)
            elif entity_type in ("email", "case_number"):
                entity["normalized"] = value.lower()
            elif entity_type == "phone":
                entity["normalized"] = re.sub(r"\D", "", value)[-10:]
            candidates.append(entity)
    rank = {name: index for index, name in enumerate(PRIORITY)}
    candidates.sort(key=lambda e: (rank[e["type"]], e["start"], -(e["end"] - e["start"])))
    kept: list[dict[str, Any]] = []
    taken: list[tuple[int, int]] = []
    for entity in candidates:
        if any(entity["start"] < end and start < entity["end"] for start, end in taken):
            continue
        taken.append((entity["start"], entity["end"]))
        entity["text"] = text[entity["start"] : entity["end"]]
        if entity.get("normalized") is None:
            entity.pop("normalized", None)
        kept.append(entity)
    kept.sort(key=lambda e: (e["start"], e["end"]))
    return [
        {
            "type": e.pop("type"),
            "text": e.pop("text"),
            "start": e.pop("start"),
            "end": e.pop("end"),
            **e,
        }
        for e in kept
    ]
