"""The manifest JSON (schema docimport-manifest/v1): writing, reading, re-checking.

Owns the document format of `manifest.schema.json` (next to this module,
the documented schema): `export_chunks` streams a manifest as JSON in
slices without holding it whole; `parse_manifest_json` validates a
document against the schema and against what a schema cannot say (paths
that stay inside the folder, no path twice); `reconcile` merges a fresh
scan of the folder with an imported document. Pure functions: no SQL, no
gRPC, no file reading.

Re-check rules of an import (ImportManifest): the facts come from a fresh
scan of the folder (size, SHA-256, type, pages, problems: never trusted
from the document), the decisions from the document (category, priority,
exclusion reason). A listed file that is gone stays listed with problem
`unreadable` ("missing"); a file whose size or SHA-256 changed is taken as
it is now; a file on disk that the document does not list is added as
excluded ("not in the imported manifest"). Each of these is a
discrepancy. Attachments are re-derived from their e-mails, not read from
the document.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from services.common import convert
from services.common.errors import FieldViolation, InvalidArgument, quote
from services.common.validate import text_problem
from services.manifest import scanner
from services.manifest.model import SCHEMA_ID, Manifest, ManifestFile, ScanOptions

SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")
CHUNK_BYTES = 256 * 1024
MAX_VIOLATIONS = 20
MAX_DISCREPANCIES = 1000


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema())
    return cls(schema(), format_checker=cls.FORMAT_CHECKER)


# ----------------------------------------------------------------- export


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _money(value: Any) -> str | None:
    return None if value is None else convert.money(value).amount


def file_json(f: ManifestFile, paths: dict[uuid.UUID, str]) -> dict[str, Any]:
    item: dict[str, Any] = {"id": str(f.file_id), "path": f.relative_path}
    if f.raw_path != f.relative_path.encode("utf-8"):
        item["raw_path_b64"] = base64.b64encode(f.raw_path).decode("ascii")
    item.update(
        size_bytes=f.size_bytes, modified_at=_iso(f.modified_at), sha256=f.sha256,
        mime_type=f.mime_type, extension_mismatch=f.extension_mismatch, type_family=f.type_family,
        category=f.category, priority=f.priority, plan=f.plan, page_count=f.page_count,
        ocr_page_count=f.ocr_page_count,
        problem={"kind": f.problem_kind, "message": f.problem_message or ""} if f.problem_kind else None,
        duplicate_of=f.duplicate_of_path or (paths.get(f.duplicate_of_file_id) if f.duplicate_of_file_id else None),
        exclusion_reason=f.exclusion_reason,
        family_parent=paths.get(f.family_parent_file_id) if f.family_parent_file_id else None,
        estimated_cost=_money(f.estimated_cost),
        importable=f.importable,
    )
    return item


def header_json(manifest: Manifest) -> dict[str, Any]:
    summary = dict(manifest.summary)
    return {
        "schema": SCHEMA_ID,
        "manifest_id": str(manifest.manifest_id),
        "case_name": manifest.case_name,
        "source_path": manifest.source_path,
        "created_at": _iso(manifest.created_at),
        "exported_at": dt.datetime.now(dt.UTC).isoformat(),
        "state": manifest.state,
        "options": manifest.options.to_json(),
        "summary": summary,
        "pricing": {
            "price_book_version": manifest.price_book_version,
            "currency_code": "USD",
            "estimated_total": _money(manifest.estimated_total),
            "note": summary.get("pricing_note", ""),
        },
    }


async def export_chunks(manifest: Manifest, batches: AsyncIterator[list[ManifestFile]]) -> AsyncIterator[bytes]:
    """The manifest document in slices of about CHUNK_BYTES; concatenated, valid JSON."""
    head = json.dumps(header_json(manifest), ensure_ascii=False, indent=None)
    buffer = [head[:-1] + ', "files": [\n']
    size = len(buffer[0])
    first = True
    # Parents and canonical files always come before the rows that name them.
    paths: dict[uuid.UUID, str] = {}
    async for batch in batches:
        for f in batch:
            item = file_json(f, paths)
            if f.type_family == "email" and f.family_parent_file_id is None:
                paths[f.file_id] = f.relative_path
            text = ("" if first else ",\n") + json.dumps(item, ensure_ascii=False)
            first = False
            buffer.append(text)
            size += len(text)
            if size >= CHUNK_BYTES:
                yield "".join(buffer).encode("utf-8")
                buffer, size = [], 0
    buffer.append("\n]}\n")
    yield "".join(buffer).encode("utf-8")


# ----------------------------------------------------------------- import


@dataclass(frozen=True)
class ImportedFile:
    raw_path: bytes
    path: str
    size_bytes: int
    sha256: str | None
    category: str
    priority: int | None
    exclusion_reason: str | None


@dataclass(frozen=True)
class ImportedManifest:
    case_name: str
    source_path: str
    options: ScanOptions
    files: dict[bytes, ImportedFile]


def _json_path(error: jsonschema.ValidationError) -> str:
    out = "manifest_json"
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_manifest_json(data: bytes) -> ImportedManifest:
    """The document, validated; INVALID_ARGUMENT with a violation per problem found."""
    if not data:
        raise InvalidArgument.field("manifest_json", "is required")
    try:
        document = json.loads(data)
    except UnicodeDecodeError:
        raise InvalidArgument.field("manifest_json", "is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument.field("manifest_json", f"is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidArgument.field("manifest_json", "is not JSON this service reads: nested too deeply") from None
    violations = _text_problems(document, "manifest_json")
    if violations:
        raise InvalidArgument(violations=violations)
    try:
        for error in _validator().iter_errors(document):
            violations.append(FieldViolation(_json_path(error), error.message[:300]))
            if len(violations) >= MAX_VIOLATIONS:
                break
    except RecursionError:
        raise InvalidArgument.field("manifest_json", "is not JSON this service reads: nested too deeply") from None
    if violations:
        raise InvalidArgument(f"the manifest does not match {SCHEMA_ID}: " + violations[0].description,
                              violations=violations) from None
    files: dict[bytes, ImportedFile] = {}
    for index, item in enumerate(document["files"]):
        where = f"manifest_json.files[{index}]"
        if item.get("family_parent"):
            continue  # attachments are re-derived from their e-mail
        if "raw_path_b64" in item:
            try:
                raw = base64.b64decode(item["raw_path_b64"], validate=True)
            except (binascii.Error, ValueError):
                violations.append(FieldViolation(f"{where}.raw_path_b64", "is not base64"))
                continue
        else:
            raw = item["path"].encode("utf-8")
        if not _safe_raw(raw):
            violations.append(FieldViolation(
                f"{where}.path", "must be relative and stay inside the folder (no '..', no leading '/')"))
        elif raw in files:
            violations.append(FieldViolation(f"{where}.path", f"{item['path']!r} is listed twice"))
        else:
            files[raw] = ImportedFile(
                raw, item["path"], item["size_bytes"], item.get("sha256"), item["category"],
                item.get("priority"), item.get("exclusion_reason"),
            )
        if len(violations) >= MAX_VIOLATIONS:
            break
    if violations:
        raise InvalidArgument(violations=violations)
    options = ScanOptions.from_json(document.get("options"))
    return ImportedManifest(document["case_name"].strip(), document["source_path"], options, files)


def _text_problems(value: Any, where: str) -> list[FieldViolation]:
    """Texts anywhere in the document (keys included) that break the rules of every
    request's text (services.common.validate): no NUL, a length cap."""
    found: list[FieldViolation] = []
    stack = [(value, where)]
    while stack and len(found) < MAX_VIOLATIONS:
        item, at = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                found.append(FieldViolation(at, problem))
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                problem = text_problem(key)
                if problem is not None:
                    found.append(FieldViolation(f"{at} (a key)", problem))
                stack.append((child, f"{at}.{quote(key, 50) if problem else key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{at}[{i}]") for i, child in reversed(list(enumerate(item))))
    return found


def _safe_raw(raw: bytes) -> bool:
    if not raw or raw.startswith(b"/") or b"\x00" in raw:
        return False
    return b".." not in raw.split(b"/")


# ----------------------------------------------------------------- re-check


@dataclass(frozen=True)
class Discrepancy:
    relative_path: str
    message: str


def reconcile(fresh: Sequence[ManifestFile], imported: ImportedManifest, priority_of: Any
              ) -> tuple[list[ManifestFile], list[Discrepancy]]:
    """Rows of the imported manifest: facts of `fresh`, decisions of `imported`."""
    rows: list[ManifestFile] = []
    notes: list[Discrepancy] = []
    seen: set[bytes] = set()
    parent_category: dict[uuid.UUID, tuple[str, int]] = {}
    for f in fresh:
        if f.family_parent_file_id is not None:
            category, priority = parent_category.get(f.family_parent_file_id, (f.category, f.priority))
            rows.append(dataclasses.replace(f, category=category, priority=priority, duplicate_of_file_id=None))
            continue
        entry = imported.files.get(f.raw_path)
        if entry is None:
            reason = f.exclusion_reason or "on disk but not in the imported manifest"
            rows.append(dataclasses.replace(f, exclusion_reason=reason, duplicate_of_file_id=None))
            notes.append(Discrepancy(f.relative_path, "on disk but not in the imported manifest: listed as excluded"))
            continue
        seen.add(f.raw_path)
        priority = entry.priority if entry.priority is not None else priority_of(entry.category)
        parent_category[f.file_id] = (entry.category, priority)
        if entry.sha256 and f.sha256 and entry.sha256 != f.sha256:
            notes.append(Discrepancy(f.relative_path, "changed since the manifest was made: the SHA-256 differs"))
        elif entry.size_bytes != f.size_bytes:
            notes.append(Discrepancy(
                f.relative_path, f"changed since the manifest was made: {f.size_bytes:,} bytes, not {entry.size_bytes:,}"))
        rows.append(dataclasses.replace(
            f, category=entry.category, priority=priority,
            exclusion_reason=entry.exclusion_reason or f.exclusion_reason, duplicate_of_file_id=None,
        ))
    for raw, entry in imported.files.items():
        if raw in seen:
            continue
        rows.append(ManifestFile(
            uuid.uuid4(), 0, scanner.display_path(raw), raw, entry.size_bytes, None, entry.sha256, "",
            False, "other", entry.category,
            entry.priority if entry.priority is not None else priority_of(entry.category),
            "unsupported", 0, 0, "unreadable",
            "missing: listed in the imported manifest but not found in the folder",
            exclusion_reason=entry.exclusion_reason,
        ))
        notes.append(Discrepancy(entry.path, "missing: listed in the imported manifest but not found in the folder"))
    return _renumber_and_dedupe(rows), notes


def _renumber_and_dedupe(rows: list[ManifestFile]) -> list[ManifestFile]:
    out = []
    canonical: dict[str, uuid.UUID] = {}
    for ordinal, f in enumerate(rows, start=1):
        duplicate_of = None
        if (f.family_parent_file_id is None and f.sha256 and f.size_bytes > 0 and f.exclusion_reason is None
                and f.problem_kind != "empty" and f.problem_kind != "unreadable"):
            first = canonical.setdefault(f.sha256, f.file_id)
            if first != f.file_id:
                duplicate_of = first
        out.append(dataclasses.replace(f, ordinal=ordinal, duplicate_of_file_id=duplicate_of))
    return out
