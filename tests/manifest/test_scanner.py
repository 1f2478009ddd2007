"""The scanner on its own: the sample case, every bad input, exclusions, families, safety."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fpdf import FPDF

from services.common.errors import InvalidArgument, NotFound
from services.manifest.errors import PermissionDenied
from services.manifest import content
from services.manifest.model import ManifestFile, ScanOptions, new_manifest_file
from services.manifest.scanner import Scanner, new_tracker, resolve_source
from conftest import SAMPLE_CASE
from manifest.conftest import IS_ROOT, NOBODY, load_expected
from manifest.trees import TOO_LARGE_LIMIT, make_bad_tree, outside_file


async def scan(scanner: Scanner, folder: Path, **options: tuple[str, ...]) -> dict[bytes, ManifestFile]:
    source = resolve_source(str(folder), [folder])
    result = await scanner.scan(source, ScanOptions(**options))
    return {f.raw_path: f for f in result.files}


async def test_sample_case_matches_the_generator_expectations(scanner: Scanner) -> None:
    expected = load_expected()
    files = await scan(scanner, SAMPLE_CASE)
    by_path = {f.relative_path: f for f in files.values()}
    top = {p: f for p, f in by_path.items() if f.family_parent_file_id is None}
    assert set(top) == set(expected)
    for rel, want in expected.items():
        f = top[rel]
        data = (SAMPLE_CASE / rel).read_bytes()
        assert f.sha256 == hashlib.sha256(data).hexdigest(), rel
        assert f.size_bytes == len(data)
        problem = want["problem"]
        if want["kind"] == "pdf" and want["pages"] is not None:
            assert f.page_count == want["pages"], rel
            assert f.ocr_page_count == want["pages"] - want["text_layer_pages"], rel
        if problem == "corrupt":
            assert (f.problem_kind, f.plan) == ("corrupt", "unsupported")
            assert f.problem_message.startswith("not a readable PDF (PDFium error 3")
        elif problem == "encrypted":
            assert f.problem_kind == "encrypted"
            assert f.problem_message == "password-protected PDF: it cannot be opened without the password"
        elif problem == "duplicate":
            canonical = top[want["duplicate_of"]]
            assert f.duplicate_of_file_id == canonical.file_id
            assert canonical.duplicate_of_file_id is None
            assert not f.importable and canonical.importable
        elif problem == "no_text_layer":
            assert (f.plan, f.page_count, f.ocr_page_count) == ("ocr", 2, 2)
        else:
            assert f.problem_kind is None, (rel, f.problem_message)
            assert f.importable, rel
    assert top["pleadings/complaint.pdf"].plan == "text_layer"
    assert top["pleadings/complaint.pdf"].category == "pleadings"
    assert top["discovery/interrogatories.docx"].plan == "docx"
    assert top["discovery/site_photo.png"].plan == "image"
    assert top["correspondence/call_notes.txt"].plan == "text"
    assert top["medical_records/er_visit_summary.pdf"].category == "medical_records"
    assert all(f.sha256 for f in top.values())
    # The e-mail's attachment is its family, after it in path order.
    mail = top["correspondence/letter_to_counsel.eml"]
    assert mail.plan == "email"
    (attachment,) = [f for f in by_path.values() if f.family_parent_file_id == mail.file_id]
    assert attachment.relative_path == "correspondence/letter_to_counsel.eml#1/settlement_offer.pdf"
    assert attachment.raw_path == b"correspondence/letter_to_counsel.eml\x00#1/settlement_offer.pdf"
    assert (attachment.mime_type, attachment.plan, attachment.page_count) == ("application/pdf", "text_layer", 1)
    assert attachment.ordinal == mail.ordinal + 1
    assert not attachment.importable
    assert (mail.page_count, mail.ocr_page_count) == (1, 0)
    ordinals = [f.ordinal for f in files.values()]
    assert sorted(ordinals) == list(range(1, len(files) + 1))


@pytest.fixture(scope="module")
def reader_scanner() -> Iterator[Scanner]:
    """A scanner whose readers are an unprivileged user when the tests run as root."""
    made = Scanner(2, max_file_bytes=TOO_LARGE_LIMIT, read_as=(NOBODY, NOBODY) if IS_ROOT else None)
    made.start()
    yield made
    made.close()


async def test_every_bad_input_is_listed_with_its_problem(reader_scanner: Scanner, case_root: Path) -> None:
    folder = case_root / "bad"
    expected = make_bad_tree(folder)
    outside_file(folder)
    files = await scan(reader_scanner, folder)
    assert set(files) == set(expected)
    for raw, (kind, exclusion, message) in expected.items():
        f = files[raw]
        assert f.problem_kind == kind, (raw, f.problem_kind, f.problem_message)
        assert f.exclusion_reason == exclusion, raw
        if message:
            assert message in (f.problem_message or ""), (raw, f.problem_message)
        if kind is not None:
            assert not f.importable
            assert f.plan == "unsupported"
    assert files[b"memo_\xff\xfe.txt"].relative_path == "memo_\\xff\\xfe.txt"
    assert files[b"line\nbreak.txt"].relative_path == "line\\x0abreak.txt"
    photo = files[b"photo.pdf"]
    assert (photo.mime_type, photo.plan, photo.extension_mismatch) == ("image/png", "image", True)
    # A followed link reads its target, which then is the duplicate (path order).
    assert files[b"alias.txt"].sha256 == files[b"notes.txt"].sha256
    assert files[b"notes.txt"].duplicate_of_file_id == files[b"alias.txt"].file_id
    # Excluded and unread files carry no hash; nothing outside was read.
    assert files[b".DS_Store"].sha256 is None
    assert files[b"escape"].sha256 is None and files[b"escape"].size_bytes >= 0
    assert files[b"huge.txt"].sha256 is None
    assert files[b"empty.pdf"].duplicate_of_file_id is None


async def test_unreadable_file_is_reported(reader_scanner: Scanner, case_root: Path) -> None:
    """chmod 000: as root, the readers drop to `nobody`, so the permission applies."""
    folder = case_root / "perm"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine\n")
    locked = folder / "locked.pdf"
    locked.write_bytes((SAMPLE_CASE / "pleadings/answer.pdf").read_bytes())
    locked.chmod(0)
    files = await scan(reader_scanner, folder)
    f = files[b"locked.pdf"]
    assert f.problem_kind == "unreadable"
    assert f.problem_message == "permission denied: the scanner may not read this file"
    assert f.sha256 is None and f.size_bytes == locked.stat().st_size
    assert files[b"ok.txt"].importable


@pytest.mark.skipif(IS_ROOT, reason="root lists any folder; the walker (not the readers) lists folders")
async def test_unlistable_folder_is_a_row(scanner: Scanner, case_root: Path) -> None:
    folder = case_root / "dirs"
    (folder / "closed").mkdir(parents=True)
    (folder / "closed" / "a.txt").write_text("a")
    (folder / "closed").chmod(0)
    files = await scan(scanner, folder)
    f = files[b"closed/"]
    assert f.problem_kind == "unreadable"
    assert f.problem_message.startswith("the folder cannot be listed")


async def test_exclusions_stay_listed_with_reason(scanner: Scanner, case_root: Path) -> None:
    folder = case_root / "excl"
    (folder / "drafts").mkdir(parents=True)
    (folder / "drafts" / "v1.txt").write_text("draft\n")
    (folder / "final.txt").write_text("final\n")
    (folder / "photo.png").write_bytes((SAMPLE_CASE / "discovery/site_photo.png").read_bytes())
    (folder / "scratch.tmp").write_text("tmp\n")
    files = await scan(scanner, folder, exclude_types=("image",), exclude_globs=("**/drafts/**", "*.tmp"))
    assert files[b"drafts/v1.txt"].exclusion_reason == "excluded by --exclude **/drafts/**"
    assert files[b"scratch.tmp"].exclusion_reason == "excluded by --exclude *.tmp"
    photo = files[b"photo.png"]
    assert photo.exclusion_reason == "excluded by --exclude-type image"
    assert (photo.mime_type, photo.sha256) == ("image/png", None)
    assert files[b"final.txt"].importable
    assert not any(f.importable for raw, f in files.items() if raw != b"final.txt")


async def test_email_attachment_types_and_duplicates(scanner: Scanner, case_root: Path) -> None:
    from email.message import EmailMessage

    folder = case_root / "mail"
    folder.mkdir()
    scanned = (SAMPLE_CASE / "discovery/scanned_deposition_excerpt.pdf").read_bytes()
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.com", "exhibits"
    msg.set_content("see attached")
    msg.add_attachment(scanned, maintype="application", subtype="pdf", filename="deposition.pdf")
    msg.add_attachment(b"", maintype="application", subtype="octet-stream", filename="empty.bin")
    msg.add_attachment("notes", subtype="plain", filename="../../etc/passwd")
    (folder / "a.eml").write_bytes(msg.as_bytes())
    (folder / "b_copy.eml").write_bytes(msg.as_bytes())
    files = await scan(scanner, folder)
    mail, copy = files[b"a.eml"], files[b"b_copy.eml"]
    assert copy.duplicate_of_file_id == mail.file_id
    children = sorted((f for f in files.values() if f.family_parent_file_id == mail.file_id),
                      key=lambda f: f.ordinal)
    assert [c.relative_path for c in children] == [
        "a.eml#1/deposition.pdf", "a.eml#2/empty.bin", "a.eml#3/.._.._etc_passwd"]
    assert (children[0].plan, children[0].ocr_page_count) == ("ocr", 2)
    assert children[1].problem_kind == "empty"
    assert (mail.page_count, mail.ocr_page_count) == (2, 2)


async def test_resolve_source_refuses_paths_outside_the_roots(case_root: Path, tmp_path: Path) -> None:
    root = case_root / "root"
    (root / "case").mkdir(parents=True)
    (root / "file.txt").write_text("x")
    os.symlink(tmp_path, root / "out")
    roots = [root]
    for bad, field in (("", "source_path"), ("relative/path", "source_path"),
                       (f"{root}/case/../case", "source_path"), (f"{root}/file.txt", "source_path")):
        with pytest.raises(InvalidArgument) as info:
            resolve_source(bad, roots)
        assert info.value.violations[0].field == field
    for outside in (str(tmp_path), "/etc", f"{root}/out", "/nonexistent/elsewhere"):
        with pytest.raises(PermissionDenied) as denied:
            resolve_source(outside, roots)
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(NotFound):
        resolve_source(f"{root}/missing", roots)
    with pytest.raises(PermissionDenied):
        resolve_source(str(root), [])
    assert resolve_source(f"{root}/case/", roots) == os.fsencode(root / "case")


async def test_big_files_among_small_ones_are_hashed_alone(scanner: Scanner, case_root: Path) -> None:
    """The walk does not stat files, so a big file lands in a batch of small ones: it is handed back."""
    folder = case_root / "mixed"
    folder.mkdir()
    big = bytes(range(256)) * ((content.WHOLE_READ_BYTES + 4096) // 256)
    (folder / "a_note.txt").write_text("before\n")
    (folder / "b_big.dat").write_bytes(big)
    (folder / "c_big_copy.dat").write_bytes(big)
    (folder / "d_note.txt").write_text("after\n")
    source = resolve_source(str(folder), [folder])
    tracker = new_tracker()
    result = await scanner.scan(source, ScanOptions(), tracker)
    files = {f.raw_path: f for f in result.files}
    assert [f.raw_path for f in result.files] == [b"a_note.txt", b"b_big.dat", b"c_big_copy.dat", b"d_note.txt"]
    assert files[b"b_big.dat"].sha256 == hashlib.sha256(big).hexdigest()
    assert files[b"b_big.dat"].size_bytes == len(big)
    assert files[b"b_big.dat"].modified_at is not None
    assert files[b"c_big_copy.dat"].duplicate_of_file_id == files[b"b_big.dat"].file_id
    assert files[b"d_note.txt"].sha256 == hashlib.sha256(b"after\n").hexdigest()
    # Bytes are known once read: the total is the bytes hashed.
    assert tracker.bytes_total == tracker.bytes_hashed == 2 * len(big) + len("before\nafter\n")
    # In a worker, the same batch hands the big file back unread, and reads it when alone.
    tasks = [(i, os.path.join(source, name), name, os.stat(source).st_dev, os.stat(os.path.join(source, name)).st_ino)
             for i, name in enumerate((b"a_note.txt", b"b_big.dat"))]
    small, handed = content.inspect_batch(tasks, frozenset(), 1 << 40)
    assert small[content.R_PROBLEM] is None and small[content.R_SIZE] == 7
    assert (handed[content.R_PROBLEM], handed[content.R_SHA256]) == (content.HANDED_BACK, None)
    (alone,) = content.inspect_batch(tasks[1:], frozenset(), 1 << 40)
    assert alone[content.R_SHA256] == hashlib.sha256(big).hexdigest()


def test_reader_checks_the_file_is_the_one_walked(case_root: Path) -> None:
    """(device, inode) from the walk; if they differ, only a file opened at the exact path counts."""
    real = case_root / "real"
    real.mkdir()
    (real / "a.txt").write_text("walked\n")
    os.symlink(real, case_root / "swapped")
    st = (real / "a.txt").stat()
    path = os.fsencode(real / "a.txt")
    via_link = os.fsencode(case_root / "swapped" / "a.txt")
    same = content.inspect_file((1, path, b"a.txt", st.st_dev, st.st_ino), frozenset(), 1 << 40)
    assert same[content.R_SHA256] == hashlib.sha256(b"walked\n").hexdigest()
    assert same[content.R_MTIME] == st.st_mtime
    # Another inode in the listing (overlayfs, bind mounts) but opened at the vetted path: read.
    listed = content.inspect_file((2, path, b"a.txt", st.st_dev, st.st_ino + 1), frozenset(), 1 << 40)
    assert listed[content.R_SHA256] == same[content.R_SHA256]
    # A folder swapped for a symlink since the walk: another inode and another real path.
    swapped = content.inspect_file((3, via_link, b"a.txt", st.st_dev, st.st_ino + 1), frozenset(), 1 << 40)
    assert swapped[content.R_SHA256] is None
    assert (swapped[content.R_PROBLEM], swapped[content.R_MESSAGE]) == (
        "unreadable", "the file was replaced during the scan; scan again")
    # Something other than a regular file where the listing said file: never read.
    os.mkfifo(case_root / "pipe")
    fifo = content.inspect_file((4, os.fsencode(case_root / "pipe"), b"pipe", st.st_dev, 0), frozenset(), 1 << 40)
    assert (fifo[content.R_PROBLEM], fifo[content.R_MESSAGE]) == ("not_a_file", "a named pipe (FIFO): not read")


def test_fast_rows_equal_rows_built_the_ordinary_way() -> None:
    args = (uuid.uuid4(), 1, "a.txt", b"a.txt", 5, None, "0" * 64, "text/plain", False, "text",
            "miscellaneous", 9, "text")
    fast = new_manifest_file(*args, problem_kind="empty", exclusion_reason="x")
    assert type(fast) is ManifestFile
    assert fast == ManifestFile(*args, problem_kind="empty", exclusion_reason="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.size_bytes = 6  # type: ignore[misc]


def test_large_files_are_inspected_like_small_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages, OCR pages and problems of a PDF read in chunks (PDFium opens it natively) equal the in-memory ones."""
    pdfs = sorted((SAMPLE_CASE).rglob("*.pdf")) + sorted(SAMPLE_CASE.rglob("*.eml"))
    assert len(pdfs) >= 5

    def inspect_all() -> list[tuple]:
        found = []
        for i, path in enumerate(pdfs):
            st = path.stat()
            found.append(content.inspect_file((i, os.fsencode(path), os.fsencode(path.name), st.st_dev, st.st_ino),
                                              frozenset(), 1 << 40))
        return found

    in_memory = inspect_all()
    monkeypatch.setattr(content, "WHOLE_READ_BYTES", 0)  # every file is "large": hashed in chunks
    chunked = inspect_all()
    assert chunked == in_memory
    kinds = {r[content.R_PROBLEM] for r in chunked}
    assert {"corrupt", "encrypted", None} <= kinds
    assert any(r[content.R_OCR_PAGES] for r in chunked) and any(r[content.R_PAGES] > r[content.R_OCR_PAGES] for r in chunked)
    if content._FD_PATHS:  # the native path was the one taken, and it names the open file
        with open(pdfs[0], "rb", buffering=0) as stream:
            assert os.path.samefile(content._native_path(stream), pdfs[0])


def test_long_pdfs_are_counted_exactly_across_reopenings(tmp_path: Path) -> None:
    """PDFium is reopened every PAGES_PER_OPEN pages (bounded memory); the counts stay exact."""
    pdf = FPDF()
    pages = 2 * content.PAGES_PER_OPEN + 7
    for index in range(pages):
        pdf.add_page()
        if index % 3 == 0:  # a text layer on every third page; the others are blank (need OCR)
            pdf.set_font("Helvetica", size=12)
            pdf.cell(text=f"page {index + 1}")
    path = tmp_path / "long.pdf"
    path.write_bytes(bytes(pdf.output()))
    with_text = len(range(0, pages, 3))
    want = (pages, pages - with_text, None, None)
    assert content.pdf_pages(path.read_bytes()) == want
    with open(path, "rb", buffering=0) as stream:
        assert content.pdf_pages(content._native_path(stream)) == want
        assert content.pdf_pages(stream) == want


def _pdf_with_a_big_scan(image_bytes: int) -> bytes:
    """Two pages: a scanned image of `image_bytes` (no text layer), then a line of text."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [4 0 R 6 0 R] /Count 2 >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /XObject << /Im0 8 0 R >> >>"
        b" /Contents 5 0 R >>",
        b"<< /Length 31 >>\nstream\nq 612 0 0 792 0 0 cm /Im0 Do Q\nendstream",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
        b" /Contents 7 0 R >>",
        b"<< /Length 41 >>\nstream\nBT /F1 12 Tf 72 720 Td (page two) Tj ET\nendstream",
        b"<< /Type /XObject /Subtype /Image /Width 1024 /Height %d /ColorSpace /DeviceGray"
        b" /BitsPerComponent 8 /Length %d >>\nstream\n" % (image_bytes // 1024, image_bytes)
        + bytes(image_bytes) + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


async def test_a_large_pdf_is_counted_by_an_unprivileged_reader(case_root: Path) -> None:
    """Over WHOLE_READ_BYTES: hashed in chunks, then opened by PDFium through /proc/self/fd."""
    data = _pdf_with_a_big_scan(content.WHOLE_READ_BYTES + (1 << 20))
    (case_root / "scan.pdf").write_bytes(data)
    (case_root / "scan.pdf").chmod(0o644)
    unprivileged = Scanner(1, read_as=(NOBODY, NOBODY) if IS_ROOT else None)
    try:
        (row,) = (await scan(unprivileged, case_root)).values()
    finally:
        unprivileged.close()
    assert (row.size_bytes, row.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (row.problem_kind, row.page_count, row.ocr_page_count, row.plan) == (None, 2, 1, "ocr")


def test_a_large_pdf_falls_back_to_reading_through_python(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """When /proc/self/fd cannot be opened, PDFium reads the open file through the stream instead."""
    data = _pdf_with_a_big_scan(1 << 20)
    path = tmp_path / "scan.pdf"
    path.write_bytes(data)
    monkeypatch.setattr(content, "WHOLE_READ_BYTES", 0)
    monkeypatch.setattr(content, "_native_path", lambda stream: str(tmp_path / "no-such-file"))
    st = path.stat()
    result = content.inspect_file((1, os.fsencode(path), b"scan.pdf", st.st_dev, st.st_ino), frozenset(), 1 << 40)
    assert result[content.R_SHA256] == hashlib.sha256(data).hexdigest()
    assert (result[content.R_PROBLEM], result[content.R_PAGES], result[content.R_OCR_PAGES]) == (None, 2, 1)
