"""ManifestService RPCs: request validation and proto <-> domain conversion.

Owns the RPC surface of `docimport.manifest.v1.ManifestService` and its
scope policy (`POLICY`): every RPC is for operators and services (the
session service reads manifests and their files), except DeleteManifest,
operators only. No SQL here (`store.py`), no file reading (`scanner.py`);
scans run as jobs of `analyzer.Analyzer`.

Status codes: malformed fields are INVALID_ARGUMENT with one field violation
each (`..` in a path, a relative path, an unknown type family, a bad
page token...); a well-formed path outside the configured source roots is
PERMISSION_DENIED (the same answer whether or not it exists); a folder
under a root that does not exist is NOT_FOUND; listing or exporting a
manifest that is still scanning or was deleted is FAILED_PRECONDITION.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from docimport.manifest.v1 import manifest_service_pb2 as pb
from docimport.manifest.v1 import manifest_service_pb2_grpc as pb_grpc

from services.common import convert
from services.common.auth import Scope, policy_for
from services.common.errors import FailedPrecondition, InvalidArgument, Validator, quote
from services.manifest import classify, jsonio, scanner
from services.manifest.analyzer import AnalyzeRequest, Analyzer, ImportAnalyzer
from services.manifest.config import ManifestSettings
from services.manifest.model import SCHEMA_VERSION, FileFilter, Manifest, ManifestFile, Progress, ScanOptions
from services.manifest.store import ManifestStore

_OP, _SVC = Scope.OPERATOR, Scope.SERVICE
POLICY = policy_for(
    pb.DESCRIPTOR.services_by_name["ManifestService"].full_name,
    {
        "AnalyzeSource": {_OP, _SVC},
        "GetManifest": {_OP, _SVC},
        "ListManifests": {_OP, _SVC},
        "ListManifestFiles": {_OP, _SVC},
        "ExportManifest": {_OP, _SVC},
        "ImportManifest": {_OP, _SVC},
        "DeleteManifest": {_OP},
    },
)

MAX_REQUEST_ID = 200
MAX_CASE_NAME = 200
MAX_GLOBS = 100
MAX_GLOB = 500

_STATES = {
    "scanning": pb.MANIFEST_STATE_SCANNING,
    "ready": pb.MANIFEST_STATE_READY,
    "failed": pb.MANIFEST_STATE_FAILED,
    "deleted": pb.MANIFEST_STATE_DELETED,
}
_PHASES = {
    "walking": pb.SCAN_PHASE_WALKING,
    "hashing": pb.SCAN_PHASE_HASHING,
    "pricing": pb.SCAN_PHASE_PRICING,
    "saving": pb.SCAN_PHASE_SAVING,
    "done": pb.SCAN_PHASE_DONE,
}
_PROBLEM_PREFIX = "PROBLEM_KIND_"


def _problem_value(kind: str | None) -> int:
    return convert.enum_value(pb.ProblemKind, kind, _PROBLEM_PREFIX) if kind else 0


# ----------------------------------------------------------------- conversion


def _counts(items: list[dict[str, Any]]) -> list[pb.Count]:
    return [pb.Count(key=c["key"], files=c["files"], bytes=c["bytes"], pages=c["pages"]) for c in items]


def _cost_lines(items: list[dict[str, Any]]) -> list[pb.CostLine]:
    return [pb.CostLine(service=c["service"], operation=c["operation"], units=c["units"],
                        amount=convert.money(c["amount"])) for c in items]


def summary_pb(summary: dict[str, Any]) -> pb.ManifestSummary:
    out = pb.ManifestSummary(
        file_count=summary.get("file_count", 0),
        total_bytes=summary.get("total_bytes", 0),
        importable_count=summary.get("importable_count", 0),
        duplicate_count=summary.get("duplicate_count", 0),
        problem_count=summary.get("problem_count", 0),
        excluded_count=summary.get("excluded_count", 0),
        page_count=summary.get("page_count", 0),
        ocr_page_count=summary.get("ocr_page_count", 0),
        by_type=_counts(summary.get("by_type", [])),
        by_category=_counts(summary.get("by_category", [])),
        by_problem=_counts(summary.get("by_problem", [])),
        by_plan=_counts(summary.get("by_plan", [])),
        estimated_by_service=_cost_lines(summary.get("estimated_by_service", [])),
        estimated_by_operation=_cost_lines(summary.get("estimated_by_operation", [])),
        price_book_version=summary.get("price_book_version") or 0,
        attachment_count=summary.get("attachment_count", 0),
        pricing_note=summary.get("pricing_note", ""),
    )
    if summary.get("estimated_total") is not None:
        out.estimated_total.CopyFrom(convert.money(summary["estimated_total"]))
    return out


def manifest_pb(m: Manifest) -> pb.Manifest:
    out = pb.Manifest(
        manifest_id=str(m.manifest_id),
        case_name=m.case_name,
        source_path=m.source_path,
        state=_STATES[m.state],
        request_id=m.request_id or "",
        error=m.error or "",
        schema_version=m.schema_version or SCHEMA_VERSION,
        summary=summary_pb(m.summary),
    )
    out.created_at.CopyFrom(convert.timestamp(m.created_at))
    return out


def file_pb(f: ManifestFile, manifest_id: uuid.UUID) -> pb.ManifestFile:
    out = pb.ManifestFile(
        file_id=str(f.file_id),
        manifest_id=str(manifest_id),
        relative_path=f.relative_path,
        raw_path=f.raw_path,
        size_bytes=f.size_bytes,
        sha256=f.sha256 or "",
        mime_type=f.mime_type,
        extension_mismatch=f.extension_mismatch,
        type_family=f.type_family,
        category=f.category,
        priority=f.priority,
        plan=convert.plan_value(f.plan),
        page_count=f.page_count,
        ocr_page_count=f.ocr_page_count,
        duplicate_of_file_id=str(f.duplicate_of_file_id) if f.duplicate_of_file_id else "",
        duplicate_of_path=f.duplicate_of_path or "",
        exclusion_reason=f.exclusion_reason or "",
        family_parent_file_id=str(f.family_parent_file_id) if f.family_parent_file_id else "",
        importable=f.importable,
    )
    if f.modified_at is not None:
        out.modified_at.CopyFrom(convert.timestamp(f.modified_at))
    if f.problem_kind:
        out.problem.CopyFrom(pb.FileProblem(kind=_problem_value(f.problem_kind), message=f.problem_message or ""))
    if f.estimated_cost is not None:
        out.estimated_cost.CopyFrom(convert.money(f.estimated_cost))
    return out


def progress_pb(p: Progress) -> pb.ScanProgress:
    out = pb.ScanProgress(
        phase=_PHASES.get(p.phase, pb.SCAN_PHASE_UNSPECIFIED),
        files_seen=p.files_seen,
        files_done=p.files_done,
        bytes_total=p.bytes_total,
        bytes_hashed=p.bytes_hashed,
        current_path=p.current_path,
        files_per_second=p.files_per_second,
        bytes_per_second=p.bytes_per_second,
    )
    if p.eta_seconds is not None:
        out.eta.CopyFrom(convert.duration(round(p.eta_seconds, 3)))
    return out


# ----------------------------------------------------------------- validation


def parse_manifest_id(value: str, field: str = "manifest_id") -> uuid.UUID:
    if not value:
        raise InvalidArgument.field(field, "is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument.field(field, f"{quote(value)} is not a manifest id (a UUID)") from None


def _options(check: Validator, types: Any, globs: Any) -> ScanOptions:
    families = []
    for i, name in enumerate(types):
        key = name.strip().lower()
        if key not in classify.FAMILIES:
            check.add(f"exclude_types[{i}]", f"{quote(name)} is not a type family; one of {', '.join(classify.FAMILIES)}")
        elif key not in families:
            families.append(key)
    patterns = []
    if len(globs) > MAX_GLOBS:
        check.add("exclude_globs", f"at most {MAX_GLOBS} patterns")
    for i, pattern in enumerate(globs):
        if not pattern.strip():
            check.add(f"exclude_globs[{i}]", "must not be empty")
        elif len(pattern) > MAX_GLOB:
            check.add(f"exclude_globs[{i}]", f"is longer than {MAX_GLOB} characters")
        elif "\x00" in pattern:
            check.add(f"exclude_globs[{i}]", "must not contain NUL characters")
        else:
            patterns.append(pattern)
    return ScanOptions(tuple(families), tuple(patterns))


def _request_id(check: Validator, value: str) -> None:
    check.require(value, "request_id")
    if len(value) > MAX_REQUEST_ID:
        check.add("request_id", f"is longer than {MAX_REQUEST_ID} characters")


class ManifestServicer(pb_grpc.ManifestServiceServicer):
    """Validates, converts, delegates."""

    def __init__(self, store: ManifestStore, analyzer: Analyzer, importer: ImportAnalyzer,
                 settings: ManifestSettings) -> None:
        self._store = store
        self._analyzer = analyzer
        self._importer = importer
        self._settings = settings

    async def AnalyzeSource(self, request: pb.AnalyzeSourceRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.AnalyzeSourceResponse]:
        check = Validator()
        _request_id(check, request.request_id)
        case_name = request.case_name.strip()
        check.require(case_name, "case_name")
        if len(case_name) > MAX_CASE_NAME:
            check.add("case_name", f"is longer than {MAX_CASE_NAME} characters")
        options = _options(check, request.exclude_types, request.exclude_globs)
        try:
            real = scanner.resolve_source(request.source_path, self._settings.source_roots)
        except InvalidArgument as exc:
            for v in exc.violations:
                check.add(v.field, v.description)
            real = b""
        check.check()
        analyze = AnalyzeRequest(request.request_id, case_name, request.source_path, real, options)
        async for event in self._analyzer.analyze(analyze):
            if isinstance(event, Progress):
                yield pb.AnalyzeSourceResponse(progress=progress_pb(event))
            else:
                yield pb.AnalyzeSourceResponse(manifest=manifest_pb(event))

    async def GetManifest(self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
                          ) -> pb.GetManifestResponse:
        manifest = await self._store.get_manifest(parse_manifest_id(request.manifest_id))
        return pb.GetManifestResponse(manifest=manifest_pb(manifest))

    async def ListManifests(self, request: pb.ListManifestsRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ListManifestsResponse:
        size = convert.page_size(request.page_size)
        cursor = convert.decode_page_token(request.page_token)
        after = None
        if cursor is not None:
            if cursor.get("n") != request.case_name:
                raise InvalidArgument.field("page_token", "does not belong to this listing")
            after = (convert.cursor_time(cursor, "c"), convert.cursor_uuid(cursor, "i"))
        manifests = await self._store.list_manifests(request.case_name, size + 1, after)
        token = ""
        if len(manifests) > size:
            manifests = manifests[:size]
            last = manifests[-1]
            token = convert.encode_page_token(
                {"n": request.case_name, "c": last.created_at.isoformat(), "i": str(last.manifest_id)})
        return pb.ListManifestsResponse(manifests=[manifest_pb(m) for m in manifests], next_page_token=token)

    async def ListManifestFiles(self, request: pb.ListManifestFilesRequest,
                                context: grpc.aio.ServicerContext) -> pb.ListManifestFilesResponse:
        check = Validator()
        manifest_id = None
        try:
            manifest_id = parse_manifest_id(request.manifest_id)
        except InvalidArgument as exc:
            for v in exc.violations:
                check.add(v.field, v.description)
        if request.type_family and request.type_family not in classify.FAMILIES:
            check.add("type_family", f"{quote(request.type_family)} is not one of {', '.join(classify.FAMILIES)}")
        problem = ""
        if request.problem:
            if request.problem not in pb.ProblemKind.values():
                check.add("problem", f"{request.problem} is not a problem kind")
            else:
                problem = convert.enum_name(pb.ProblemKind, request.problem, _PROBLEM_PREFIX)
        try:
            size = convert.page_size(request.page_size)
        except InvalidArgument as exc:
            for v in exc.violations:
                check.add(v.field, v.description)
        flt = FileFilter(
            category=request.category,
            type_family=request.type_family,
            duplicate=request.duplicate if request.HasField("duplicate") else None,
            has_problem=request.has_problem if request.HasField("has_problem") else None,
            excluded=request.excluded if request.HasField("excluded") else None,
            problem=problem,
            importable=request.importable if request.HasField("importable") else None,
        )
        after = 0
        try:
            cursor = convert.decode_page_token(request.page_token)
        except InvalidArgument as exc:
            cursor = None
            for v in exc.violations:
                check.add(v.field, v.description)
        if cursor is not None:
            if cursor.get("m") != request.manifest_id or cursor.get("f") != flt.key():
                check.add("page_token", "does not belong to this listing (other manifest or filters)")
            else:
                try:
                    after = convert.cursor_int(cursor, "o", bits=32)  # ordinal is an integer
                except InvalidArgument as exc:
                    for v in exc.violations:
                        check.add(v.field, v.description)
        check.check()
        assert manifest_id is not None
        manifest = await self._store.get_manifest(manifest_id)
        _require_listable(manifest)
        files, total = await self._store.list_files(manifest_id, flt, size + 1, after)
        token = ""
        if len(files) > size:
            files = files[:size]
            token = convert.encode_page_token({"m": request.manifest_id, "f": flt.key(), "o": files[-1].ordinal})
        return pb.ListManifestFilesResponse(
            files=[file_pb(f, manifest_id) for f in files], next_page_token=token, total_size=total)

    async def DeleteManifest(self, request: pb.DeleteManifestRequest, context: grpc.aio.ServicerContext
                             ) -> pb.DeleteManifestResponse:
        await self._store.delete_manifest(parse_manifest_id(request.manifest_id))
        return pb.DeleteManifestResponse()

    async def ExportManifest(self, request: pb.ExportManifestRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.ExportManifestResponse]:
        manifest = await self._store.get_manifest(parse_manifest_id(request.manifest_id))
        _require_listable(manifest)
        async for chunk in jsonio.export_chunks(manifest, self._store.iter_files(manifest.manifest_id)):
            yield pb.ExportManifestResponse(data=chunk)

    async def ImportManifest(self, request: pb.ImportManifestRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ImportManifestResponse:
        check = Validator()
        _request_id(check, request.request_id)
        check.require(request.manifest_json, "manifest_json")
        check.check()
        imported = jsonio.parse_manifest_json(request.manifest_json)
        source_path = request.source_path or imported.source_path
        field = "source_path" if request.source_path else "manifest_json.source_path"
        real = scanner.resolve_source(source_path, self._settings.source_roots, field)
        manifest, notes = await self._importer.import_manifest(request.request_id, imported, source_path, real)
        return pb.ImportManifestResponse(
            manifest=manifest_pb(manifest),
            discrepancies=[pb.Discrepancy(relative_path=d.relative_path, message=d.message) for d in notes],
        )


def _require_listable(manifest: Manifest) -> None:
    if manifest.state in ("ready", "failed"):
        return
    why = "is still being scanned" if manifest.state == "scanning" else "was deleted"
    raise FailedPrecondition(f"manifest {manifest.manifest_id} {why}", subject=f"manifests/{manifest.manifest_id}")
