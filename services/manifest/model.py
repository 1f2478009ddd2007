"""The manifest service's domain values: frozen dataclasses, no I/O.

Owns the shapes that pass between the scanner (which makes them), the store
(which writes and reads them) and the servicer (which turns them into
protos). Nothing here knows SQL, gRPC or the file system.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from decimal import Decimal
from typing import Any

SCHEMA_ID = "docimport-manifest/v1"
SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One row of a manifest: a file on disk, or an attachment of an e-mail."""

    file_id: uuid.UUID
    ordinal: int
    relative_path: str
    raw_path: bytes
    size_bytes: int
    modified_at: dt.datetime | None
    sha256: str | None
    mime_type: str
    extension_mismatch: bool
    type_family: str
    category: str
    priority: int
    plan: str
    page_count: int = 0
    ocr_page_count: int = 0
    problem_kind: str | None = None
    problem_message: str | None = None
    duplicate_of_file_id: uuid.UUID | None = None
    exclusion_reason: str | None = None
    family_parent_file_id: uuid.UUID | None = None
    estimated_cost: Decimal | None = None
    # Read-side only (joined): the canonical file's path.
    duplicate_of_path: str | None = None

    @property
    def importable(self) -> bool:
        """Will be imported: no problem, not a duplicate, not excluded, not an attachment."""
        return (
            self.problem_kind is None
            and self.duplicate_of_file_id is None
            and self.exclusion_reason is None
            and self.family_parent_file_id is None
        )


# A twin of ManifestFile, unfrozen, with the same slots in the same order.
_ManifestFileDraft = make_dataclass(
    "_ManifestFileDraft",
    [(f.name, f.type, field(default=f.default)) if f.default is not MISSING else (f.name, f.type)
     for f in fields(ManifestFile)],
    slots=True,
)


def new_manifest_file(*args: Any, **kwargs: Any) -> ManifestFile:
    """`ManifestFile(*args, **kwargs)` at a fifth of the cost, for the scanner's 100,000 rows.

    A frozen dataclass's `__init__` sets each of its 22 fields through
    `object.__setattr__` (2.6 us a row, a tenth of the per-file budget of a
    scan of small files); the unfrozen twin sets them as plain slot stores,
    and the finished object then becomes a ManifestFile (`__class__`
    assignment: the two classes have the same slot layout, which Python
    checks, so a field added to one and not the other fails at once).
    """
    made = _ManifestFileDraft(*args, **kwargs)
    made.__class__ = ManifestFile  # type: ignore[assignment]
    return made  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class CostLine:
    service: str
    operation: str
    units: str
    amount: Decimal


@dataclass(frozen=True)
class Pricing:
    """What the cost service said about the importable files (or why it did not)."""

    price_book_version: int | None
    total: Decimal | None
    by_service: tuple[CostLine, ...] = ()
    by_operation: tuple[CostLine, ...] = ()
    per_file: dict[int, Decimal] = field(default_factory=dict)
    note: str = ""

    @property
    def priced(self) -> bool:
        return self.total is not None


@dataclass(frozen=True)
class ScanOptions:
    exclude_types: tuple[str, ...] = ()
    exclude_globs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"exclude_types": list(self.exclude_types), "exclude_globs": list(self.exclude_globs)}

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> ScanOptions:
        value = value or {}
        return cls(tuple(value.get("exclude_types", ())), tuple(value.get("exclude_globs", ())))


@dataclass(frozen=True)
class Manifest:
    manifest_id: uuid.UUID
    request_id: str | None
    case_name: str
    source_path: str
    state: str
    error: str | None
    schema_version: int
    options: ScanOptions
    summary: dict[str, Any]
    price_book_version: int | None
    estimated_total: Decimal | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class FileFilter:
    category: str = ""
    type_family: str = ""
    duplicate: bool | None = None
    has_problem: bool | None = None
    excluded: bool | None = None
    problem: str = ""
    importable: bool | None = None

    def key(self) -> str:
        """A fingerprint, so a page token is refused under other filters."""
        return repr((self.category, self.type_family, self.duplicate, self.has_problem,
                     self.excluded, self.problem, self.importable))


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running scan."""

    phase: str
    files_seen: int
    files_done: int
    bytes_total: int
    bytes_hashed: int
    current_path: str
    files_per_second: float
    bytes_per_second: float
    eta_seconds: float | None
