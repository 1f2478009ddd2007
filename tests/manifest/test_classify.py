"""Content sniffing, extension mismatch, hidden files, categories, globs, display paths."""

from __future__ import annotations

import pytest

from services.manifest import classify
from services.manifest.scanner import compile_glob, display_path
from conftest import SAMPLE_CASE


@pytest.mark.parametrize(
    ("rel", "mime", "family"),
    [
        ("pleadings/complaint.pdf", "application/pdf", "pdf"),
        ("discovery/interrogatories.docx", classify.MIME_DOCX, "word"),
        ("discovery/site_photo.png", "image/png", "image"),
        ("correspondence/letter_to_counsel.eml", "message/rfc822", "email"),
        ("correspondence/call_notes.txt", "text/plain", "text"),
        ("medical_records/corrupt_scan.pdf", "application/pdf", "pdf"),
    ],
)
def test_sniff_sample_files_by_content(rel: str, mime: str, family: str) -> None:
    head = (SAMPLE_CASE / rel).read_bytes()[: classify.SNIFF_BYTES]
    assert classify.sniff(head) == classify.ContentType(mime, family)


@pytest.mark.parametrize(
    ("head", "mime"),
    [
        (b"", "application/x-empty"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00", "video/mp4"),
        (b"\x00\x00\x00\x18ftypqt  \x00\x00", "video/quicktime"),
        (b"ID3\x03\x00\x00\x00", "audio/mpeg"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio/wav"),
        (b"PK\x03\x04" + b"\x00" * 26 + b"xl/workbook.xml", classify.MIME_XLSX),
        (b"PK\x03\x04" + b"\x00" * 26 + b"notes.txt", classify.MIME_ZIP),
        (b"<!DOCTYPE html><html><body>x</body></html>", "text/html"),
        (b"From: a@b.c\r\nSubject: hi\r\nDate: x\r\n\r\nbody", "message/rfc822"),
        (b"Subject line without headers\nDear Sir", "text/plain"),
        (b"BMW service record, 2021\n", "text/plain"),
        (b"caf\xe9 au lait\n", "text/plain"),
        (b"\x00\x01\x02\x03garbage\xff\xfe\x00", "application/octet-stream"),
        (b"junk before\n%PDF-1.4\n", "application/pdf"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + "EncryptedPackage".encode("utf-16-le"), classify.MIME_OOXML_ENCRYPTED),
    ],
)
def test_sniff_signatures(head: bytes, mime: str) -> None:
    assert classify.sniff(head).mime == mime


def test_extension_mismatch_compares_families() -> None:
    png = classify.ContentType("image/png", "image")
    assert classify.extension_mismatch(b"scan.pdf", png)
    assert not classify.extension_mismatch(b"photo.PNG", png)
    assert not classify.extension_mismatch(b"no_extension", png)
    assert not classify.extension_mismatch(b"unknown.xyz", png)
    mail = classify.ContentType("message/rfc822", "email")
    assert not classify.extension_mismatch(b"saved.txt", mail)


@pytest.mark.parametrize(
    ("name", "hidden_in", "reason"),
    [
        (b".DS_Store", None, "system file: macOS folder metadata (.DS_Store)"),
        (b"Thumbs.db", None, "system file: Windows thumbnail cache (Thumbs.db)"),
        (b"desktop.ini", None, "system file: Windows folder settings (desktop.ini)"),
        (b"~$complaint.docx", None, "Office lock file (~$...): a temporary file of an open document"),
        (b"._complaint.pdf", None, "macOS resource fork (._ file)"),
        (b".secret", None, "hidden file (name starts with '.')"),
        (b"config", b".git", "inside hidden folder .git"),
        (b"complaint.pdf", None, None),
    ],
)
def test_hidden_reasons(name: bytes, hidden_in: bytes | None, reason: str | None) -> None:
    assert classify.hidden_reason(name, in_hidden_folder=hidden_in) == reason


def test_categories_from_nearest_folder_with_priorities() -> None:
    cat = classify.Categorizer()
    assert cat.category(("pleadings",)) == "pleadings"
    assert cat.category(("02 - Medical Records",)) == "medical_records"
    assert cat.category(("discovery", "Depositions")) == "depositions"
    assert cat.category(("Client Emails", "2024")) == "correspondence"
    assert cat.category(("random", "stuff")) == "miscellaneous"
    assert cat.category(()) == "miscellaneous"
    assert cat.priority("pleadings") < cat.priority("miscellaneous")
    custom = classify.Categorizer({"insurance": ["policies", "claims"]}, {"insurance": 5})
    assert custom.category(("Claims",)) == "insurance"
    assert custom.category(("pleadings",)) == "miscellaneous"
    assert custom.priority("insurance") == 5


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.tmp", "a/b/c.tmp", True),
        ("*.tmp", "c.tmp", True),
        ("*.tmp", "a/c.tmpx", False),
        ("**/drafts/**", "pleadings/drafts/v1.docx", True),
        ("**/drafts/**", "drafts/v1.docx", True),
        ("**/drafts/**", "pleadings/final/v1.docx", False),
        ("pleadings/*.pdf", "pleadings/a.pdf", True),
        ("pleadings/*.pdf", "pleadings/x/a.pdf", False),
        ("file?.txt", "dir/file1.txt", True),
        ("[ab].txt", "a.txt", True),
        ("[!ab].txt", "a.txt", False),
    ],
)
def test_globs(pattern: str, path: str, matches: bool) -> None:
    assert bool(compile_glob(pattern).match(path)) is matches


def test_display_path_escapes_undecodable_bytes_and_controls() -> None:
    assert display_path(b"caf\xc3\xa9.txt") == "café.txt"
    assert display_path(b"bad\xffname.txt") == "bad\\xffname.txt"
    assert display_path(b"line\nbreak.txt") == "line\\x0abreak.txt"


def test_plans() -> None:
    pdf = classify.ContentType("application/pdf", "pdf")
    assert classify.plan_for(pdf, 0) == "text_layer"
    assert classify.plan_for(pdf, 1) == "ocr"
    assert classify.plan_for(classify.ContentType(classify.MIME_DOCX, "word"), 0) == "docx"
    assert classify.plan_for(classify.ContentType("message/rfc822", "email"), 0) == "email"
    assert classify.plan_for(classify.ContentType("image/png", "image"), 0) == "image"
    assert classify.plan_for(classify.ContentType("text/html", "text"), 0) == "text"
    assert classify.plan_for(classify.ContentType("video/mp4", "video"), 0) == "unsupported"
    assert classify.plan_for(classify.ContentType(classify.MIME_DOC, "word"), 0) == "unsupported"


def test_may_be_hidden_is_false_only_when_no_hidden_reason() -> None:
    for name in (b".DS_Store", b"THUMBS.DB", b"ehthumbs.db", b"Desktop.ini", b"Icon\r", b".localized",
                 b"~$draft.docx", b"._photo.jpg", b".env", b"notes.txt", b"complaint.pdf", b"x"):
        if classify.hidden_reason(name) is not None:
            assert classify.may_be_hidden(name), name
    assert not classify.may_be_hidden(b"complaint_final.pdf")
