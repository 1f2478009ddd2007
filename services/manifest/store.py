"""All SQL of the manifest service: `manifest.manifests` and `manifest.manifest_files`.

Owns both tables (the only writer; other services read manifests over
gRPC). Returns frozen dataclasses of `model.py`, never Records or protos.
Files are written in one transaction per scan with `copy_records_to_table`
(~100,000 rows in well under a second); the manifest turns `ready` in the
same transaction, so a reader never sees half a manifest.

A running scan holds a session-level advisory lock on its manifest
(`scan_lock`): a retry of the same request that finds the manifest still
`scanning` and can take the lock knows the scan died with its process, and
scans again; one that cannot take it knows the scan is alive elsewhere.

Deleting is soft: the manifest keeps its row with state `deleted` (so a
retried AnalyzeSource still answers, and sessions made from it keep their
reference), its file rows are removed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any

import asyncpg

from services.common.errors import FailedPrecondition, NotFound
from services.manifest.model import (
    SCHEMA_VERSION,
    FileFilter,
    Manifest,
    ManifestFile,
    Pricing,
    ScanOptions,
)

# First key of the advisory locks of manifest scans ("mani").
_LOCK_CLASS = 0x6D616E69

_FILE_COLUMNS = (
    "file_id", "manifest_id", "ordinal", "relative_path", "raw_path", "size_bytes",
    "modified_at", "sha256", "mime_type", "extension_mismatch", "type_family", "category",
    "priority", "plan", "page_count", "ocr_page_count", "problem_kind", "problem_message",
    "duplicate_of_file_id", "exclusion_reason", "family_parent_file_id", "estimated_cost",
)

_MANIFEST_SELECT = """
    SELECT manifest_id, request_id, case_name, source_path, state, error, schema_version,
           options, summary, price_book_version, estimated_total, created_at, finished_at
      FROM manifest.manifests
"""

_IMPORTABLE = ("f.problem_kind IS NULL AND f.duplicate_of_file_id IS NULL"
               " AND f.exclusion_reason IS NULL AND f.family_parent_file_id IS NULL")


def _lock_key(manifest_id: uuid.UUID) -> int:
    value = manifest_id.int & 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def _manifest(row: asyncpg.Record) -> Manifest:
    return Manifest(
        manifest_id=row["manifest_id"],
        request_id=row["request_id"],
        case_name=row["case_name"],
        source_path=row["source_path"],
        state=row["state"],
        error=row["error"],
        schema_version=row["schema_version"],
        options=ScanOptions.from_json(row["options"]),
        summary=row["summary"] or {},
        price_book_version=row["price_book_version"],
        estimated_total=row["estimated_total"],
        created_at=row["created_at"],
        finished_at=row["finished_at"],
    )


def _file(row: asyncpg.Record) -> ManifestFile:
    return ManifestFile(
        file_id=row["file_id"],
        ordinal=row["ordinal"],
        relative_path=row["relative_path"],
        raw_path=bytes(row["raw_path"]),
        size_bytes=row["size_bytes"],
        modified_at=row["modified_at"],
        sha256=row["sha256"],
        mime_type=row["mime_type"],
        extension_mismatch=row["extension_mismatch"],
        type_family=row["type_family"],
        category=row["category"],
        priority=row["priority"],
        plan=row["plan"],
        page_count=row["page_count"],
        ocr_page_count=row["ocr_page_count"],
        problem_kind=row["problem_kind"],
        problem_message=row["problem_message"],
        duplicate_of_file_id=row["duplicate_of_file_id"],
        exclusion_reason=row["exclusion_reason"],
        family_parent_file_id=row["family_parent_file_id"],
        estimated_cost=row["estimated_cost"],
        duplicate_of_path=row["duplicate_of_path"],
    )


class ManifestStore:
    """The manifest tables, through an asyncpg pool the caller owns."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # ------------------------------------------------------------- manifests

    async def create_manifest(
        self, manifest_id: uuid.UUID, request_id: str | None, case_name: str, source_path: str,
        options: ScanOptions,
    ) -> tuple[Manifest, bool]:
        """(manifest, created); an existing manifest of the same request_id is returned as is."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                """
                INSERT INTO manifest.manifests
                       (manifest_id, request_id, case_name, source_path, state, schema_version, options)
                VALUES ($1, $2, $3, $4, 'scanning', $5, $6)
                ON CONFLICT (request_id) DO NOTHING
                RETURNING manifest_id
                """,
                manifest_id, request_id, case_name, source_path, SCHEMA_VERSION, options.to_json(),
            )
            if row is not None:
                created = await conn.fetchrow(_MANIFEST_SELECT + " WHERE manifest_id = $1", manifest_id)
                return _manifest(created), True
            existing = await conn.fetchrow(_MANIFEST_SELECT + " WHERE request_id = $1", request_id)
        if existing is None:  # deleted between the two statements: not for this call to fix
            raise NotFound("manifest", f"request_id={request_id}")
        return _manifest(existing), False

    async def get_manifest(self, manifest_id: uuid.UUID) -> Manifest:
        row = await self._pool.fetchrow(_MANIFEST_SELECT + " WHERE manifest_id = $1", manifest_id)
        if row is None:
            raise NotFound("manifest", str(manifest_id))
        return _manifest(row)

    async def find_by_request_id(self, request_id: str) -> Manifest | None:
        row = await self._pool.fetchrow(_MANIFEST_SELECT + " WHERE request_id = $1", request_id)
        return _manifest(row) if row is not None else None

    async def list_manifests(
        self, case_name: str, limit: int, after: tuple[dt.datetime, uuid.UUID] | None
    ) -> list[Manifest]:
        """Newest first; deleted manifests are not listed."""
        rows = await self._pool.fetch(
            _MANIFEST_SELECT
            + """
             WHERE state <> 'deleted'
               AND ($1 = '' OR case_name = $1)
               AND ($2::timestamptz IS NULL OR (created_at, manifest_id) < ($2, $3))
             ORDER BY created_at DESC, manifest_id DESC
             LIMIT $4
            """,
            case_name, after[0] if after else None, after[1] if after else None, limit,
        )
        return [_manifest(r) for r in rows]

    async def save_scan(
        self, manifest_id: uuid.UUID, files: Sequence[ManifestFile], summary: dict[str, Any],
        pricing: Pricing | None,
    ) -> Manifest:
        """Writes every file row and turns the manifest `ready`, in one transaction."""
        per_file = pricing.per_file if pricing is not None else {}
        records = [
            (f.file_id, manifest_id, f.ordinal, f.relative_path, f.raw_path, f.size_bytes,
             f.modified_at, f.sha256, f.mime_type, f.extension_mismatch, f.type_family, f.category,
             f.priority, f.plan, f.page_count, f.ocr_page_count, f.problem_kind, f.problem_message,
             f.duplicate_of_file_id, f.exclusion_reason, f.family_parent_file_id,
             per_file.get(f.ordinal, f.estimated_cost))
            for f in files
        ]
        async with self._pool.acquire() as conn, conn.transaction():
            state = await conn.fetchval(
                "SELECT state FROM manifest.manifests WHERE manifest_id = $1 FOR UPDATE", manifest_id
            )
            if state is None:
                raise NotFound("manifest", str(manifest_id))
            if state != "scanning":
                raise FailedPrecondition(f"manifest {manifest_id} is {state}, not scanning",
                                         subject=f"manifests/{manifest_id}")
            await conn.execute("DELETE FROM manifest.manifest_files WHERE manifest_id = $1", manifest_id)
            await conn.copy_records_to_table(
                "manifest_files", schema_name="manifest", columns=_FILE_COLUMNS, records=records
            )
            row = await conn.fetchrow(
                """
                UPDATE manifest.manifests
                   SET state = 'ready', summary = $2, price_book_version = $3,
                       estimated_total = $4, finished_at = now(), error = NULL
                 WHERE manifest_id = $1
                RETURNING manifest_id
                """,
                manifest_id, summary,
                pricing.price_book_version if pricing is not None and pricing.priced else None,
                pricing.total if pricing is not None else None,
            )
        return await self.get_manifest(row["manifest_id"])

    async def fail_scan(self, manifest_id: uuid.UUID, error: str) -> None:
        await self._pool.execute(
            """
            UPDATE manifest.manifests SET state = 'failed', error = $2, finished_at = now()
             WHERE manifest_id = $1 AND state = 'scanning'
            """,
            manifest_id, error,
        )

    async def delete_manifest(self, manifest_id: uuid.UUID) -> Manifest:
        """Soft delete: state `deleted`, files removed. Deleting twice is a no-op."""
        async with self._pool.acquire() as conn, conn.transaction():
            state = await conn.fetchval(
                "SELECT state FROM manifest.manifests WHERE manifest_id = $1 FOR UPDATE", manifest_id
            )
            if state is None:
                raise NotFound("manifest", str(manifest_id))
            if state == "scanning":
                raise FailedPrecondition(
                    "the manifest is still being scanned; delete it when the scan has finished",
                    subject=f"manifests/{manifest_id}",
                )
            if state != "deleted":
                await conn.execute("DELETE FROM manifest.manifest_files WHERE manifest_id = $1", manifest_id)
                await conn.execute(
                    "UPDATE manifest.manifests SET state = 'deleted', deleted_at = now() WHERE manifest_id = $1",
                    manifest_id,
                )
        return await self.get_manifest(manifest_id)

    @contextlib.asynccontextmanager
    async def scan_lock(self, manifest_id: uuid.UUID) -> AsyncIterator[bool]:
        """Holds the manifest's scan lock for the block; yields False when another holds it."""
        async with self._pool.acquire() as conn:
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", _LOCK_CLASS, _lock_key(manifest_id))
            try:
                yield bool(got)
            finally:
                if got:
                    await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_CLASS, _lock_key(manifest_id))

    # ------------------------------------------------------------- files

    def _where(self, flt: FileFilter) -> tuple[str, list[Any]]:
        clauses = ["f.manifest_id = $1"]
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args) + 1}"

        if flt.category:
            clauses.append(f"f.category = {arg(flt.category)}")
        if flt.type_family:
            clauses.append(f"f.type_family = {arg(flt.type_family)}")
        if flt.problem:
            clauses.append(f"f.problem_kind = {arg(flt.problem)}")
        for value, column in ((flt.duplicate, "duplicate_of_file_id"), (flt.has_problem, "problem_kind"),
                              (flt.excluded, "exclusion_reason")):
            if value is not None:
                clauses.append(f"f.{column} IS {'NOT ' if value else ''}NULL")
        if flt.importable is not None:
            clauses.append(f"({_IMPORTABLE}) IS {'TRUE' if flt.importable else 'NOT TRUE'}")
        return " AND ".join(clauses), args

    async def list_files(
        self, manifest_id: uuid.UUID, flt: FileFilter, limit: int, after_ordinal: int
    ) -> tuple[list[ManifestFile], int]:
        """A page of files by ordinal after `after_ordinal`, and how many match in all."""
        where, args = self._where(flt)
        count_sql = f"SELECT count(*) FROM manifest.manifest_files f WHERE {where}"
        n = len(args)
        page_sql = f"""
            SELECT f.*, d.relative_path AS duplicate_of_path
              FROM manifest.manifest_files f
              LEFT JOIN manifest.manifest_files d ON d.file_id = f.duplicate_of_file_id
             WHERE {where} AND f.ordinal > ${n + 2}
             ORDER BY f.ordinal
             LIMIT ${n + 3}
        """
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(page_sql, manifest_id, *args, after_ordinal, limit)
            total = await conn.fetchval(count_sql, manifest_id, *args)
        return [_file(r) for r in rows], total

    async def iter_files(self, manifest_id: uuid.UUID, batch: int = 5000) -> AsyncIterator[list[ManifestFile]]:
        """Every file of a manifest in ordinal order, `batch` at a time."""
        after = 0
        while True:
            files, _ = await self._page(manifest_id, after, batch)
            if not files:
                return
            yield files
            after = files[-1].ordinal

    async def _page(self, manifest_id: uuid.UUID, after: int, limit: int) -> tuple[list[ManifestFile], int]:
        rows = await self._pool.fetch(
            """
            SELECT f.*, d.relative_path AS duplicate_of_path
              FROM manifest.manifest_files f
              LEFT JOIN manifest.manifest_files d ON d.file_id = f.duplicate_of_file_id
             WHERE f.manifest_id = $1 AND f.ordinal > $2
             ORDER BY f.ordinal
             LIMIT $3
            """,
            manifest_id, after, limit,
        )
        return [_file(r) for r in rows], len(rows)

    async def estimated_total(self, manifest_id: uuid.UUID) -> Decimal | None:
        return await self._pool.fetchval(
            "SELECT estimated_total FROM manifest.manifests WHERE manifest_id = $1", manifest_id
        )
