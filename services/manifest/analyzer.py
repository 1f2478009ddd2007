"""Runs scans as jobs: scan, price, summarise, save; streams their progress.

Owns the life of a manifest from `scanning` to `ready` or `failed`: the
asyncio task of each running scan (`Analyzer._jobs`, cancelled by `close`),
the cap on concurrent scans (`max_concurrent`; more wait their turn), and
the summary written with the rows. No SQL (the store), no gRPC messages
(the servicer), no file reading (the scanner).

A scan is not tied to the call that started it: when the client goes away
the scan goes on, and a retry with the same request_id attaches to it (or,
once it is over, gets the finished manifest). A manifest left `scanning`
by a process that died is scanned again by the first retry that can take
its scan lock (see `ManifestStore.scan_lock`); while another process holds
the lock, a retry waits for that scan's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import DomainError, InvalidArgument, Unavailable
from services.manifest import scanner as scanning
from services.manifest.metrics import ManifestMetrics
from services.manifest.model import Manifest, ManifestFile, Pricing, Progress, ScanOptions
from services.manifest.pricing import Pricer
from services.manifest.scanner import Scanner, Tracker
from services.manifest.store import ManifestStore

logger = logging.getLogger(__name__)


def summarize(files: Sequence[ManifestFile], pricing: Pricing | None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest summary (stored as JSON; see ManifestSummary in the proto).

    Counts are over the files on disk (attachments are counted apart);
    pages and OCR pages, and `by_plan`, are over importable files: what an
    import will process and pay for.
    """
    groups: dict[str, dict[str, list[int]]] = {
        "by_type": defaultdict(lambda: [0, 0, 0]),
        "by_category": defaultdict(lambda: [0, 0, 0]),
        "by_problem": defaultdict(lambda: [0, 0, 0]),
        "by_plan": defaultdict(lambda: [0, 0, 0]),
    }
    counts = dict(file_count=0, total_bytes=0, importable_count=0, duplicate_count=0,
                  problem_count=0, excluded_count=0, page_count=0, ocr_page_count=0,
                  attachment_count=0)

    def add(group: str, key: str, f: ManifestFile) -> None:
        cell = groups[group][key]
        cell[0] += 1
        cell[1] += f.size_bytes
        cell[2] += f.page_count

    for f in files:
        if f.family_parent_file_id is not None:
            counts["attachment_count"] += 1
            continue
        counts["file_count"] += 1
        counts["total_bytes"] += f.size_bytes
        add("by_type", f.type_family, f)
        add("by_category", f.category, f)
        if f.problem_kind:
            counts["problem_count"] += 1
            add("by_problem", f.problem_kind, f)
        if f.duplicate_of_file_id is not None:
            counts["duplicate_count"] += 1
        if f.exclusion_reason is not None:
            counts["excluded_count"] += 1
        if f.importable:
            counts["importable_count"] += 1
            counts["page_count"] += f.page_count
            counts["ocr_page_count"] += f.ocr_page_count
            add("by_plan", f.plan, f)
    summary: dict[str, Any] = dict(counts)
    for name, table in groups.items():
        summary[name] = [
            {"key": key, "files": v[0], "bytes": v[1], "pages": v[2]}
            for key, v in sorted(table.items(), key=lambda kv: (-kv[1][0], kv[0]))
        ]
    if pricing is not None and pricing.priced:
        summary["estimated_total"] = str(pricing.total)
        summary["price_book_version"] = pricing.price_book_version
        summary["estimated_by_service"] = [_line(x) for x in pricing.by_service]
        summary["estimated_by_operation"] = [_line(x) for x in pricing.by_operation]
        summary["pricing_note"] = ""
    else:
        summary["estimated_total"] = None
        summary["price_book_version"] = None
        summary["estimated_by_service"] = []
        summary["estimated_by_operation"] = []
        summary["pricing_note"] = pricing.note if pricing is not None else "not priced"
    summary.update(extra or {})
    return summary


def _line(line: Any) -> dict[str, str]:
    return {"service": line.service, "operation": line.operation, "units": line.units,
            "amount": str(line.amount)}


@dataclass(frozen=True)
class AnalyzeRequest:
    request_id: str
    case_name: str
    source_path: str
    source_real: bytes
    options: ScanOptions


@dataclass
class _Job:
    manifest_id: uuid.UUID
    tracker: Tracker
    started: asyncio.Future[bool]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def stored_source_path(requested: str, real: bytes) -> str:
    """The real path when it is valid text, else the path as requested."""
    try:
        return real.decode("utf-8")
    except UnicodeDecodeError:
        return requested


class Analyzer:
    """Starts, tracks and finishes scans."""

    def __init__(self, store: ManifestStore, scanner: Scanner, pricer: Pricer, *,
                 max_concurrent: int = 2, poll_interval: float = 0.25,
                 metrics: ManifestMetrics | None = None) -> None:
        self._metrics = metrics
        self._store = store
        self._scanner = scanner
        self._pricer = pricer
        self._slots = asyncio.Semaphore(max(max_concurrent, 1))
        self._poll = poll_interval
        self._jobs: dict[uuid.UUID, _Job] = {}

    async def analyze(self, request: AnalyzeRequest) -> AsyncIterator[Progress | Manifest]:
        """Progress snapshots of the scan for `request`, then its finished manifest."""
        manifest, created = await self._store.create_manifest(
            uuid.uuid4(), request.request_id, request.case_name,
            stored_source_path(request.source_path, request.source_real), request.options,
        )
        if not created:
            _check_same(manifest, request)
        async for event in self._follow(manifest, request.source_real):
            yield event

    async def _follow(self, manifest: Manifest, source: bytes) -> AsyncIterator[Progress | Manifest]:
        while manifest.state == "scanning":
            job = self._jobs.get(manifest.manifest_id)
            if job is None:
                job = await self._start(manifest, source)
            if job is None:  # scanning in another process: wait for its outcome
                await asyncio.sleep(max(self._poll, 1.0))
                yield Progress("hashing", 0, 0, 0, 0, "(scanning in another replica)", 0, 0, None)
            else:
                async for snapshot in self._watch(job):
                    yield snapshot
            manifest = await self._store.get_manifest(manifest.manifest_id)
            if manifest.state == "scanning" and job is not None and job.task is not None \
                    and job.task.done() and job.task.cancelled():
                raise Unavailable("the scan was interrupted (the service is stopping); retry the request")
        yield manifest

    async def _start(self, manifest: Manifest, source: bytes) -> _Job | None:
        loop = asyncio.get_running_loop()
        job = _Job(manifest.manifest_id, scanning.new_tracker(), loop.create_future())
        self._jobs[manifest.manifest_id] = job
        job.task = asyncio.create_task(self._run(job, manifest, source), name=f"scan-{manifest.manifest_id}")
        if await job.started:
            return job
        return None

    async def _watch(self, job: _Job) -> AsyncIterator[Progress]:
        last = None
        while not job.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.done.wait(), self._poll)
            snapshot = job.tracker.snapshot()
            key = (snapshot.phase, snapshot.files_seen, snapshot.files_done, snapshot.bytes_hashed)
            if key != last:
                last = key
                yield snapshot

    async def _run(self, job: _Job, manifest: Manifest, source: bytes) -> None:
        tracker = job.tracker
        try:
            async with self._store.scan_lock(manifest.manifest_id) as got:
                if not job.started.done():
                    job.started.set_result(got)
                if not got:
                    return
                current = await self._store.get_manifest(manifest.manifest_id)
                if current.state != "scanning":
                    return
                try:
                    async with self._slots:
                        tracker.started = time.monotonic()  # rates exclude the wait for a slot
                        result = await self._scanner.scan(source, manifest.options, tracker)
                    tracker.phase = "pricing"
                    pricing = await self._pricer.price(result.files)
                    tracker.phase = "saving"
                    summary = summarize(result.files, pricing)
                    await self._store.save_scan(manifest.manifest_id, result.files, summary, pricing)
                    tracker.phase = "done"
                    if self._metrics is not None:
                        self._metrics.scanned(result.files, result.elapsed)
                        self._metrics.scans["ready"].inc()
                    logger.info("manifest ready", extra={
                        "manifest_id": str(manifest.manifest_id), "files": len(result.files),
                        "seconds": round(result.elapsed, 3)})
                except asyncio.CancelledError:
                    raise
                except DomainError as exc:
                    if self._metrics is not None:
                        self._metrics.scans["failed"].inc()
                    await self._store.fail_scan(manifest.manifest_id, exc.message)
                except Exception as exc:  # noqa: BLE001 - a scan fails, the service goes on
                    logger.exception("scan failed", extra={"manifest_id": str(manifest.manifest_id)})
                    if self._metrics is not None:
                        self._metrics.scans["failed"].inc()
                    await self._store.fail_scan(
                        manifest.manifest_id, f"the scan failed unexpectedly ({type(exc).__name__}); see the service log")
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - e.g. the database went away before the lock
            logger.exception("scan could not run", extra={"manifest_id": str(manifest.manifest_id)})
        finally:
            if not job.started.done():
                job.started.set_result(False)
            self._jobs.pop(manifest.manifest_id, None)
            job.done.set()

    async def run_scan(self, source: bytes, options: ScanOptions) -> list[ManifestFile]:
        """A scan outside any job (ImportManifest's re-check), within the concurrency cap."""
        async with self._slots:
            result = await self._scanner.scan(source, options)
        return result.files

    async def price(self, files: Sequence[ManifestFile]) -> Pricing:
        return await self._pricer.price(files)

    async def close(self) -> None:
        """Cancels running scans; their manifests stay `scanning` for a retry to take over."""
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _check_same(manifest: Manifest, request: AnalyzeRequest) -> None:
    same = (
        manifest.case_name == request.case_name
        and manifest.options == request.options
        and manifest.source_path in (request.source_path,
                                     stored_source_path(request.source_path, request.source_real))
    )
    if not same:
        raise InvalidArgument.field(
            "request_id", f"was already used for another request (manifest {manifest.manifest_id}); "
            "use a new request_id")



class ImportAnalyzer:
    """ImportManifest: re-checks an imported document against its folder, then saves it."""

    def __init__(self, store: ManifestStore, analyzer: Analyzer, categorizer: Any) -> None:
        self._store = store
        self._analyzer = analyzer
        self._categorizer = categorizer

    async def import_manifest(self, request_id: str, imported: Any, source_path: str, source_real: bytes
                              ) -> tuple[Manifest, list[Any]]:
        from services.common.errors import Aborted
        from services.manifest.jsonio import MAX_DISCREPANCIES, Discrepancy, reconcile

        manifest, created = await self._store.create_manifest(
            uuid.uuid4(), request_id, imported.case_name, stored_source_path(source_path, source_real),
            imported.options,
        )
        if not created and manifest.case_name != imported.case_name:
            raise InvalidArgument.field(
                "request_id", f"was already used for another request (manifest {manifest.manifest_id})")

        def notes_of(m: Manifest) -> list[Any]:
            return [Discrepancy(d["relative_path"], d["message"]) for d in m.summary.get("discrepancies", [])]

        if manifest.state != "scanning":
            return manifest, notes_of(manifest)
        async with self._store.scan_lock(manifest.manifest_id) as got:
            if not got:
                raise Aborted("an import with this request_id is running; retry in a moment")
            manifest = await self._store.get_manifest(manifest.manifest_id)
            if manifest.state != "scanning":
                return manifest, notes_of(manifest)
            try:
                fresh = await self._analyzer.run_scan(source_real, imported.options)
                rows, notes = reconcile(fresh, imported, self._categorizer.priority)
                pricing = await self._analyzer.price(rows)
                extra = {
                    "imported": True,
                    "discrepancy_count": len(notes),
                    "discrepancies": [{"relative_path": d.relative_path, "message": d.message}
                                      for d in notes[:MAX_DISCREPANCIES]],
                }
                summary = summarize(rows, pricing, extra)
                manifest = await self._store.save_scan(manifest.manifest_id, rows, summary, pricing)
            except asyncio.CancelledError:
                raise
            except DomainError as exc:
                await self._store.fail_scan(manifest.manifest_id, exc.message)
                raise
            except Exception as exc:
                await self._store.fail_scan(
                    manifest.manifest_id, f"the import failed unexpectedly ({type(exc).__name__})")
                raise
        return manifest, notes
