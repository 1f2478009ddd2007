"""ManifestService over a real channel: analyze, list, export/import, errors, pricing."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from pathlib import Path

import asyncpg
import grpc
import jsonschema
import pytest
from docimport.common.v1 import common_pb2
from docimport.manifest.v1 import manifest_service_pb2 as pb
from google.rpc import error_details_pb2

from services.common.errors import details_of
from services.manifest import jsonio
from services.manifest.scanner import Scanner
from manifest.conftest import IS_ROOT, NOBODY, Harness, load_expected, make_harness
from manifest.trees import TOO_LARGE_LIMIT, make_bad_tree, outside_file


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    found = {}
    for bad in details_of(error, error_details_pb2.BadRequest):
        for v in bad.field_violations:
            found[v.field] = v.description
    return found


async def test_analyze_sample_case_streams_progress_then_a_priced_manifest(
        service: Harness, sample_copy: Path) -> None:
    progress, manifest = await service.analyze(sample_copy)
    assert progress, "no progress event"
    assert progress[-1].files_seen >= 11
    assert manifest.state == pb.MANIFEST_STATE_READY
    assert manifest.schema_version == 1
    s = manifest.summary
    assert (s.file_count, s.attachment_count, s.duplicate_count, s.problem_count) == (11, 1, 1, 2)
    assert s.importable_count == 8
    # Pages of importable files: complaint 3 + answer 2 + deposition 2 + er 2 + image 1 + e-mail's attachment 1.
    assert s.page_count == 11
    assert s.ocr_page_count == 3
    assert {c.key: c.files for c in s.by_problem} == {"corrupt": 1, "encrypted": 1}
    assert {c.key: c.files for c in s.by_category} == {
        "medical_records": 4, "discovery": 3, "correspondence": 2, "pleadings": 2}
    assert {c.key: c.files for c in s.by_type}["pdf"] == 7
    # Priced by the cost service: a total, lines by service, the book version.
    assert s.price_book_version >= 1
    assert s.pricing_note == ""
    total = Decimal(s.estimated_total.amount)
    assert total > 0
    assert sum(Decimal(line.amount.amount) for line in s.estimated_by_service) == total
    files = await service.files(manifest.manifest_id)
    assert len(files) == 12
    per_file = [Decimal(f.estimated_cost.amount) for f in files if f.importable]
    assert len(per_file) == 8 and sum(per_file) == total
    assert all(not f.HasField("estimated_cost") for f in files if not f.importable)
    expected = load_expected()
    by_path = {f.relative_path: f for f in files}
    for rel, want in expected.items():
        f = by_path[rel]
        if want["problem"] == "corrupt":
            assert f.problem.kind == pb.PROBLEM_KIND_CORRUPT
        elif want["problem"] == "encrypted":
            assert f.problem.kind == pb.PROBLEM_KIND_ENCRYPTED
        elif want["problem"] == "duplicate":
            assert f.duplicate_of_path == want["duplicate_of"]
            assert f.duplicate_of_file_id == by_path[want["duplicate_of"]].file_id
        elif want["problem"] == "no_text_layer":
            assert (f.plan, f.page_count, f.ocr_page_count) == (common_pb2.PROCESSING_PLAN_OCR, 2, 2)
    attachment = by_path["correspondence/letter_to_counsel.eml#1/settlement_offer.pdf"]
    assert attachment.family_parent_file_id == by_path["correspondence/letter_to_counsel.eml"].file_id


async def test_analyze_is_idempotent_by_request_id(service: Harness, sample_copy: Path) -> None:
    request_id = str(uuid.uuid4())
    _, first = await service.analyze(sample_copy, request_id=request_id)
    progress, again = await service.analyze(sample_copy, request_id=request_id)
    assert again.manifest_id == first.manifest_id
    assert progress == []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await service.analyze(sample_copy, request_id=request_id, case="Another case")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in violations(info.value)


async def test_concurrent_retries_attach_to_one_scan(service: Harness, sample_copy: Path) -> None:
    request_id = str(uuid.uuid4())
    results = await asyncio.gather(*(service.analyze(sample_copy, request_id=request_id) for _ in range(3)))
    assert len({m.manifest_id for _, m in results}) == 1
    listed = await service.stub().ListManifests(pb.ListManifestsRequest())
    assert len(listed.manifests) == 1


async def test_a_scan_goes_on_when_the_client_leaves(service: Harness, sample_copy: Path) -> None:
    request_id = str(uuid.uuid4())
    call = service.stub().AnalyzeSource(pb.AnalyzeSourceRequest(
        request_id=request_id, source_path=str(sample_copy), case_name="Smith"))
    await call.read()
    call.cancel()
    _, manifest = await service.analyze(sample_copy, request_id=request_id, case="Smith")
    assert manifest.state == pb.MANIFEST_STATE_READY
    assert manifest.summary.file_count == 11


@pytest.mark.parametrize(
    ("path", "code", "field"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT, "source_path"),
        ("relative/case", grpc.StatusCode.INVALID_ARGUMENT, "source_path"),
        ("{root}/smith-v-jones/../smith-v-jones", grpc.StatusCode.INVALID_ARGUMENT, "source_path"),
        ("{root}/smith-v-jones/pleadings/answer.pdf", grpc.StatusCode.INVALID_ARGUMENT, "source_path"),
        ("/etc", grpc.StatusCode.PERMISSION_DENIED, None),
        ("/definitely/not/here", grpc.StatusCode.PERMISSION_DENIED, None),
        ("{root}/missing", grpc.StatusCode.NOT_FOUND, None),
    ],
)
async def test_analyze_refuses_bad_paths(service: Harness, sample_copy: Path, path: str,
                                         code: grpc.StatusCode, field: str | None) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await service.analyze(path.format(root=service.root))
    assert info.value.code() == code
    if field:
        assert field in violations(info.value)
    listed = await service.stub().ListManifests(pb.ListManifestsRequest())
    assert listed.manifests == []


async def test_analyze_validates_every_field(service: Harness, sample_copy: Path) -> None:
    stub = service.stub()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.AnalyzeSource(pb.AnalyzeSourceRequest(
                source_path=str(sample_copy), case_name="  ", request_id="",
                exclude_types=["video", "holograms"], exclude_globs=[""])):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(info.value)) == {"request_id", "case_name", "exclude_types[1]", "exclude_globs[0]"}


async def test_a_folder_of_bad_inputs_finishes_and_reports_each(
        pool: asyncpg.Pool, token_env: dict[str, object], case_root: Path, cost_addr: str) -> None:
    folder = case_root / "bad"
    expected = make_bad_tree(folder)
    outside_file(folder)
    overrides: dict[str, object] = {"max_file_bytes": TOO_LARGE_LIMIT, "scan_workers": 2}
    if IS_ROOT:  # chmod 000 stops `nobody`, not root: the readers drop to nobody
        overrides.update(scan_uid=NOBODY, scan_gid=NOBODY)
    harness = await make_harness(pool, token_env, case_root, scanner=None, cost_addr=cost_addr, **overrides)
    try:
        _, manifest = await harness.analyze(folder)
        assert manifest.state == pb.MANIFEST_STATE_READY
        files = {f.raw_path: f for f in await harness.files(manifest.manifest_id)}
        assert set(files) == set(expected)
        for raw, (kind, exclusion, message) in expected.items():
            f = files[raw]
            want = pb.ProblemKind.Value("PROBLEM_KIND_" + kind.upper()) if kind else 0
            assert f.problem.kind == want, (raw, f.problem)
            assert f.exclusion_reason == (exclusion or ""), raw
            assert message in f.problem.message, (raw, f.problem.message)
        assert files[b"memo_\xff\xfe.txt"].relative_path == "memo_\\xff\\xfe.txt"
        loops = await harness.files(manifest.manifest_id, problem=pb.PROBLEM_KIND_NOT_A_FILE)
        assert {f.raw_path for f in loops} >= {b"loop", b"ping", b"pong", b"escape", b"dangling", b"pipe"}
        unreadable = await harness.files(manifest.manifest_id, problem=pb.PROBLEM_KIND_UNREADABLE)
        assert [f.raw_path for f in unreadable] == [b"locked.txt"]
    finally:
        for channel in harness.channels:
            await channel.close()
        await harness.server.close(0.5)


async def test_unpriced_when_the_cost_service_is_unreachable(
        pool: asyncpg.Pool, token_env: dict[str, object], case_root: Path, scanner: Scanner,
        sample_copy: Path) -> None:
    harness = await make_harness(pool, token_env, case_root, scanner=scanner, cost_addr="127.0.0.1:1",
                                 rpc_timeout=3.0)
    try:
        _, manifest = await harness.analyze(sample_copy)
        assert manifest.state == pb.MANIFEST_STATE_READY
        assert not manifest.summary.HasField("estimated_total")
        assert manifest.summary.price_book_version == 0
        assert manifest.summary.pricing_note.startswith("not priced: the cost service did not answer (UNAVAILABLE")
        files = await harness.files(manifest.manifest_id)
        assert all(not f.HasField("estimated_cost") for f in files)
        assert manifest.summary.importable_count == 8
    finally:
        for channel in harness.channels:
            await channel.close()
        await harness.server.close(0.5)


async def test_list_manifests_and_files_paginate_and_filter(service: Harness, sample_copy: Path) -> None:
    stub = service.stub()
    made = [await service.analyze(sample_copy, case=f"Case {i % 2}") for i in range(3)]
    page = await stub.ListManifests(pb.ListManifestsRequest(page_size=2))
    rest = await stub.ListManifests(pb.ListManifestsRequest(page_size=2, page_token=page.next_page_token))
    assert len(page.manifests) == 2 and len(rest.manifests) == 1 and not rest.next_page_token
    ids = [m.manifest_id for m in (*page.manifests, *rest.manifests)]
    assert ids == [m.manifest_id for _, m in reversed(made)]
    case0 = await stub.ListManifests(pb.ListManifestsRequest(case_name="Case 0"))
    assert len(case0.manifests) == 2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListManifests(pb.ListManifestsRequest(case_name="Case 1", page_token=page.next_page_token))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    manifest_id = made[0][1].manifest_id
    first = await stub.ListManifestFiles(pb.ListManifestFilesRequest(manifest_id=manifest_id, page_size=5))
    assert len(first.files) == 5 and first.total_size == 12
    second = await stub.ListManifestFiles(pb.ListManifestFilesRequest(
        manifest_id=manifest_id, page_size=5, page_token=first.next_page_token))
    assert not {f.file_id for f in first.files} & {f.file_id for f in second.files}
    assert len(await service.files(manifest_id)) == 12

    async def count(**filters: object) -> int:
        return (await stub.ListManifestFiles(pb.ListManifestFilesRequest(manifest_id=manifest_id, **filters))).total_size

    assert await count(importable=True) == 8
    assert await count(importable=False) == 4
    assert await count(duplicate=True) == 1
    assert await count(has_problem=True) == 2
    assert await count(problem=pb.PROBLEM_KIND_ENCRYPTED) == 1
    assert await count(excluded=True) == 0
    assert await count(category="pleadings") == 2
    assert await count(type_family="pdf") == 8
    assert await count(type_family="pdf", importable=True) == 4
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListManifestFiles(pb.ListManifestFilesRequest(
            manifest_id=manifest_id, importable=True, page_token=first.next_page_token))
    assert "page_token" in violations(info.value)
    for bad in ({"manifest_id": "nope"}, {"manifest_id": manifest_id, "type_family": "hologram"},
                {"manifest_id": manifest_id, "page_size": -1}, {"manifest_id": manifest_id, "problem": 99},
                {"manifest_id": manifest_id, "page_token": "!!"}):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListManifestFiles(pb.ListManifestFilesRequest(**bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListManifestFiles(pb.ListManifestFilesRequest(manifest_id=str(uuid.uuid4())))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_and_delete(service: Harness, sample_copy: Path) -> None:
    _, manifest = await service.analyze(sample_copy)
    stub = service.stub()
    got = await stub.GetManifest(pb.GetManifestRequest(manifest_id=manifest.manifest_id))
    assert got.manifest == manifest
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetManifest(pb.GetManifestRequest(manifest_id=str(uuid.uuid4())))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetManifest(pb.GetManifestRequest(manifest_id="not-a-uuid"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await stub.DeleteManifest(pb.DeleteManifestRequest(manifest_id=manifest.manifest_id))
    await stub.DeleteManifest(pb.DeleteManifestRequest(manifest_id=manifest.manifest_id))
    got = await stub.GetManifest(pb.GetManifestRequest(manifest_id=manifest.manifest_id))
    assert got.manifest.state == pb.MANIFEST_STATE_DELETED
    assert (await stub.ListManifests(pb.ListManifestsRequest())).manifests == []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListManifestFiles(pb.ListManifestFilesRequest(manifest_id=manifest.manifest_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_scopes(service: Harness, sample_copy: Path) -> None:
    _, manifest = await service.analyze(sample_copy, stub=service.stub("service"))
    reader = service.stub("service")
    await reader.GetManifest(pb.GetManifestRequest(manifest_id=manifest.manifest_id))
    await reader.ListManifestFiles(pb.ListManifestFilesRequest(manifest_id=manifest.manifest_id))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await reader.DeleteManifest(pb.DeleteManifestRequest(manifest_id=manifest.manifest_id))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await service.stub("worker").GetManifest(pb.GetManifestRequest(manifest_id=manifest.manifest_id))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def export(stub, manifest_id: str) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join([chunk.data async for chunk in stub.ExportManifest(
        pb.ExportManifestRequest(manifest_id=manifest_id))])


async def test_export_validates_against_the_schema_and_imports_back(service: Harness, sample_copy: Path) -> None:
    (sample_copy / "odd_\xe9.txt").write_text("odd name\n")
    _, manifest = await service.analyze(sample_copy)
    stub = service.stub()
    data = await export(stub, manifest.manifest_id)
    document = json.loads(data)
    jsonschema.validate(document, jsonio.schema())
    assert document["schema"] == "docimport-manifest/v1"
    assert document["pricing"]["estimated_total"] == manifest.summary.estimated_total.amount
    assert len(document["files"]) == 13
    by_path = {f["path"]: f for f in document["files"]}
    assert by_path["medical_records/er_visit_summary_copy.pdf"]["duplicate_of"] == "medical_records/er_visit_summary.pdf"
    assert by_path["correspondence/letter_to_counsel.eml#1/settlement_offer.pdf"]["family_parent"] == \
        "correspondence/letter_to_counsel.eml"

    # Round trip: the same folder, unchanged -> the same facts, no discrepancy.
    response = await stub.ImportManifest(pb.ImportManifestRequest(request_id=str(uuid.uuid4()), manifest_json=data))
    assert response.discrepancies == []
    again = response.manifest
    assert again.manifest_id != manifest.manifest_id and again.state == pb.MANIFEST_STATE_READY
    for field in ("file_count", "importable_count", "duplicate_count", "problem_count", "page_count",
                  "ocr_page_count", "attachment_count", "estimated_total"):
        assert getattr(again.summary, field) == getattr(manifest.summary, field), field
    reexported = json.loads(await export(stub, again.manifest_id))
    strip = ("id", "estimated_cost")
    assert [{k: v for k, v in f.items() if k not in strip} for f in reexported["files"]] == \
        [{k: v for k, v in f.items() if k not in strip} for f in document["files"]]

    # Decisions of the document win; facts are re-checked against the files.
    for f in document["files"]:
        if f["path"] == "pleadings/answer.pdf":
            f["category"], f["priority"] = "exhibits", 7
        if f["path"] == "correspondence/call_notes.txt":
            f["exclusion_reason"] = "privileged: reviewed by counsel"
    document["files"] = [f for f in document["files"] if f["path"] != "discovery/site_photo.png"]
    document["files"].append({"path": "pleadings/gone.pdf", "size_bytes": 10, "category": "pleadings",
                              "plan": "text_layer", "sha256": "0" * 64})
    (sample_copy / "pleadings/complaint.pdf").write_bytes(b"%PDF-1.4 changed")
    response = await stub.ImportManifest(pb.ImportManifestRequest(
        request_id=str(uuid.uuid4()), manifest_json=json.dumps(document).encode()))
    notes = {d.relative_path: d.message for d in response.discrepancies}
    assert notes == {
        "discovery/site_photo.png": "on disk but not in the imported manifest: listed as excluded",
        "pleadings/gone.pdf": "missing: listed in the imported manifest but not found in the folder",
        "pleadings/complaint.pdf": "changed since the manifest was made: the SHA-256 differs",
    }
    files = {f.relative_path: f for f in await service.files(response.manifest.manifest_id)}
    assert (files["pleadings/answer.pdf"].category, files["pleadings/answer.pdf"].priority) == ("exhibits", 7)
    assert files["correspondence/call_notes.txt"].exclusion_reason == "privileged: reviewed by counsel"
    assert files["pleadings/gone.pdf"].problem.kind == pb.PROBLEM_KIND_UNREADABLE
    assert files["pleadings/complaint.pdf"].problem.kind == pb.PROBLEM_KIND_CORRUPT


async def test_import_refuses_bad_documents(service: Harness, sample_copy: Path) -> None:
    stub = service.stub()

    async def refused(data: bytes, **extra: str) -> dict[str, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ImportManifest(pb.ImportManifestRequest(
                request_id=str(uuid.uuid4()), manifest_json=data, **extra))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        return violations(info.value)

    base = {"schema": "docimport-manifest/v1", "case_name": "X", "source_path": str(sample_copy), "files": []}
    assert "manifest_json" in await refused(b"{not json")
    assert "manifest_json.schema" in await refused(json.dumps({**base, "schema": "docimport-manifest/v9"}).encode())
    bad_file = {"path": "a.pdf", "size_bytes": -1, "category": "x", "plan": "teleport"}
    found = await refused(json.dumps({**base, "files": [bad_file]}).encode())
    assert {"manifest_json.files[0].size_bytes", "manifest_json.files[0].plan"} <= set(found)
    for path in ("../../etc/passwd", "/etc/passwd", "a/../../b"):
        traversal = {"path": path, "size_bytes": 1, "category": "x", "plan": "text"}
        assert "manifest_json.files[0].path" in await refused(json.dumps({**base, "files": [traversal]}).encode())
    twice = {"path": "a.txt", "size_bytes": 1, "category": "x", "plan": "text"}
    assert "manifest_json.files[1].path" in await refused(json.dumps({**base, "files": [twice, twice]}).encode())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ImportManifest(pb.ImportManifestRequest(
            request_id=str(uuid.uuid4()), manifest_json=json.dumps({**base, "source_path": "/etc"}).encode()))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_export_of_unknown_or_deleted_manifest(service: Harness, sample_copy: Path) -> None:
    stub = service.stub()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await export(stub, str(uuid.uuid4()))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    _, manifest = await service.analyze(sample_copy)
    await stub.DeleteManifest(pb.DeleteManifestRequest(manifest_id=manifest.manifest_id))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await export(stub, manifest.manifest_id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
