"""Processors on the sample case (see examples/make_sample_case.py EXPECTED) and edge cases."""

from __future__ import annotations

import io
import os
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from services.worker.processors import chunk as chunk_proc
from services.worker.processors import entities as entities_proc
from services.worker.processors.base import (
    Deadline,
    PermanentError,
    RetryableError,
    Usage,
    sniff,
)
from services.worker.processors.extract import Extractor, check_source, resolve_source
from services.worker.processors.text import decode, html_to_text

from .helpers import PLANS, SAMPLE_CASE, sha256_of


def extract(
    extractor: Extractor, relative: str, root: Path = SAMPLE_CASE, plan: str | None = None
) -> tuple[dict[str, Any], Usage]:
    usage = Usage()
    document = extractor.extract_path(
        root / relative, plan or PLANS[relative], extractor.context(usage, Deadline(120))
    )
    return document, usage


def words(text: str) -> str:
    return " ".join(text.split())


# -- PDF ---------------------------------------------------------------------


def test_text_pdf_reads_every_page_from_the_text_layer(extractor: Extractor) -> None:
    document, usage = extract(extractor, "pleadings/complaint.pdf")
    assert document["page_count"] == 3
    assert [p["source"] for p in document["pages"]] == ["text_layer"] * 3
    assert usage.total_ocr_pages == 0
    text = document["text"]
    assert "Case No. 2:24-cv-01234" in text
    assert "\r" not in text
    # Page spans index the text and cover each page in order.
    starts = [p["start"] for p in document["pages"]]
    assert starts == sorted(starts) and starts[0] == 0
    assert "PRAYER FOR RELIEF" in text[document["pages"][2]["start"] : document["pages"][2]["end"]]


def test_scanned_pdf_is_ocrd_page_by_page_and_finds_known_words(scanned: dict[str, Any]) -> None:
    document, usage = scanned["document"], scanned["usage"]
    assert document["page_count"] == 2
    assert [p["source"] for p in document["pages"]] == ["ocr", "ocr"]
    assert usage.ocr_pages == {"local": 2}
    text = words(document["text"])
    for phrase in (
        "Page 14",
        "ROBERT JONES",
        "Conshohocken",
        "Was she in the crosswalk?",
        "Twenty-five, maybe thirty.",
        "Page 15",
        "Officer Delgado",
        "I paid it, $150.00.",
        # The small footer font loses its spaces: "KEYSTONECOURT REPORTING(215)555-0166".
        "555-0166",
    ):
        assert phrase in text, phrase


@pytest.mark.parametrize(
    ("relative", "code"),
    [
        ("medical_records/corrupt_scan.pdf", "corrupt"),
        ("medical_records/sealed_records.pdf", "encrypted"),
    ],
)
def test_corrupt_and_encrypted_pdfs_are_permanent_failures(
    extractor: Extractor, relative: str, code: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        extract(extractor, relative)
    assert caught.value.code == code
    assert caught.value.permanent


def test_pdf_pages_without_text_stay_empty_when_ocr_is_off() -> None:
    document, usage = extract(Extractor(None), "discovery/scanned_deposition_excerpt.pdf")
    assert [p["source"] for p in document["pages"]] == ["no_ocr", "no_ocr"]
    assert usage.total_ocr_pages == 0
    assert len(document["warnings"]) == 2


def test_an_expired_deadline_stops_a_pdf_between_pages(extractor: Extractor) -> None:
    with pytest.raises(RetryableError) as caught:
        extractor.extract_path(
            SAMPLE_CASE / "pleadings/complaint.pdf",
            "text_layer",
            extractor.context(Usage(), Deadline(-1)),
        )
    assert caught.value.code == "lease_expired"


# -- Word, e-mail, text, HTML, images -----------------------------------------------


def test_docx_reads_paragraphs_and_tables_in_order(extractor: Extractor) -> None:
    document, _ = extract(extractor, "discovery/interrogatories.docx")
    text = document["text"]
    assert "Case No. 2:24-cv-01234" in text
    assert "INTERROGATORY NO. 1:" in text
    table_rows = [line for line in text.splitlines() if " | " in line]
    assert table_rows, "the definitions table is read row by row"
    assert (
        text.index("Definitions") < text.index(table_rows[0]) < text.index("INTERROGATORY NO. 1:")
    )


def test_docx_that_is_not_a_zip_is_corrupt_and_an_ole_one_is_encrypted(
    extractor: Extractor, tmp_path: Path
) -> None:
    (tmp_path / "bad.docx").write_bytes(b"PK\x03\x04 this is not really a zip file word/")
    (tmp_path / "locked.docx").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 600)
    with pytest.raises(PermanentError) as bad:
        extract(extractor, "bad.docx", tmp_path, "docx")
    with pytest.raises(PermanentError) as locked:
        extract(extractor, "locked.docx", tmp_path, "docx")
    assert (bad.value.code, locked.value.code) == ("corrupt", "encrypted")


def test_eml_has_headers_body_and_the_attached_pdf_after_a_marker(extractor: Extractor) -> None:
    document, _ = extract(extractor, "correspondence/letter_to_counsel.eml")
    text = document["text"]
    assert text.startswith('From: "Anita R. Patel" <apatel@patelinjurylaw.example>')
    assert "Subject: Smith v. Jones, No. 2:24-cv-01234 - settlement offer" in text
    marker = "===== Attachment 1: settlement_offer.pdf (application/pdf) ====="
    assert marker in text
    body, attachment = document["parts"]
    assert body["label"] == "body" and text.index("Following our call") < body["end"]
    assert attachment["filename"] == "settlement_offer.pdf" and attachment["status"] == "extracted"
    assert "Fed. R. Evid. 408" in text[attachment["start"] : attachment["end"]]
    assert document["page_count"] == 1
    assert document["pages"][0]["part"] == "attachment 1: settlement_offer.pdf"


def test_eml_attachments_that_cannot_be_read_do_not_fail_the_message(
    extractor: Extractor, tmp_path: Path
) -> None:
    message = EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.com"
    message["Subject"] = "bundle"
    message.add_alternative(
        "<html><body><p>Hello <b>there</b></p><script>x()</script></body></html>", subtype="html"
    )
    corrupt = (SAMPLE_CASE / "medical_records/corrupt_scan.pdf").read_bytes()
    message.add_attachment(corrupt, maintype="application", subtype="pdf", filename="broken.pdf")
    message.add_attachment("plain notes, café", filename="notes.txt")
    inner = EmailMessage()
    inner["From"] = "c@example.com"
    inner["Subject"] = "forwarded"
    inner.set_content("the inner body")
    message.add_attachment(inner)
    (tmp_path / "bundle.eml").write_bytes(bytes(message))
    document, _ = extract(extractor, "bundle.eml", tmp_path, "email")
    text = document["text"]
    assert "Hello there" in text and "x()" not in text
    assert "[attachment not extracted: corrupt:" in text
    assert "plain notes, café" in text
    assert "the inner body" in text and "Subject: forwarded" in text
    statuses = [p["status"] for p in document["parts"] if "filename" in p]
    assert statuses == ["corrupt", "extracted", "extracted"]
    assert any("broken.pdf" in w for w in document["warnings"])


def test_text_charset_detection(extractor: Extractor, tmp_path: Path) -> None:
    document, _ = extract(extractor, "correspondence/call_notes.txt")
    assert document["encoding"] == "utf-8"
    assert "café" in document["text"] and "Zoë" in document["text"] and "§ 1983" in document["text"]
    legacy = "Le café de Zoë coûte 3 € à Noël; réunion déjà prévue à l'hôtel.\n" * 20
    (tmp_path / "legacy.txt").write_bytes(legacy.encode("cp1252"))
    document, _ = extract(extractor, "legacy.txt", tmp_path, "text")
    assert document["text"] == legacy
    assert document["encoding"] == "cp1252"


def test_html_becomes_text(extractor: Extractor, tmp_path: Path) -> None:
    html = (
        "<!DOCTYPE html><html><head><title>T</title><style>p{}</style></head><body>"
        "<h1>Notice</h1><p>Amount:&nbsp;$1,200.00 &amp; costs</p>"
        "<table><tr><td>a</td><td>b</td></tr></table>"
        "<script>alert(1)</script></body></html>"
    )
    (tmp_path / "page.html").write_text(html, encoding="utf-8")
    document, _ = extract(extractor, "page.html", tmp_path, "text")
    assert document["media_type"] == "text/html"
    assert document["text"] == "Notice\n\nAmount: $1,200.00 & costs\n\na | b"
    assert html_to_text("<p>one<br>two</p>") == "one\ntwo"


def test_binary_garbage_is_not_text() -> None:
    with pytest.raises(PermanentError) as caught:
        decode(bytes(range(256)) * 64)
    assert caught.value.code == "unsupported"


def test_image_is_ocrd(extractor: Extractor) -> None:
    document, usage = extract(extractor, "discovery/site_photo.png")
    assert usage.ocr_pages == {"local": 1}
    assert document["page_count"] == 1
    text = document["text"]
    assert "Philadelphia" in text and "03/15/2024" in text


def test_image_without_ocr_engine_is_a_permanent_failure() -> None:
    with pytest.raises(PermanentError) as caught:
        extract(Extractor(None), "discovery/site_photo.png")
    assert caught.value.code == "ocr_unavailable"


def test_unsupported_plan_is_permanent(extractor: Extractor) -> None:
    with pytest.raises(PermanentError) as caught:
        extract(extractor, "pleadings/complaint.pdf", plan="unsupported")
    assert caught.value.code == "unsupported"


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"%PDF-1.7\n", "pdf"),
        (b"PK\x03\x04....word/document.xml", "docx"),
        (b"\x89PNG\r\n\x1a\n....", "image"),
        (b"\xff\xd8\xff\xe0", "image"),
        (b"From: a@b.c\r\nTo: d@e.f\r\nSubject: x\r\n\r\nbody", "email"),
        (b"<!doctype html><html>", "html"),
        (b"Dear Sir,\nFrom: the notes", "text"),
        (b"\x00\x01\x02binary", "unknown"),
    ],
)
def test_sniff_by_content(head: bytes, kind: str) -> None:
    assert sniff(head)[0] == kind


# -- source checks -------------------------------------------------------------------


def test_source_must_match_its_hash_and_not_be_empty(case_copy: Path) -> None:
    complaint = case_copy / "pleadings/complaint.pdf"
    assert check_source(complaint, sha256_of(complaint)) == complaint.stat().st_size
    with pytest.raises(PermanentError) as changed:
        check_source(complaint, "0" * 64)
    assert changed.value.code == "source_changed"
    empty = case_copy / "empty.pdf"
    empty.write_bytes(b"")
    with pytest.raises(PermanentError) as caught:
        check_source(empty, "")
    assert caught.value.code == "empty"
    with pytest.raises(RetryableError) as missing:
        check_source(case_copy / "gone.pdf", "")
    assert missing.value.code == "source_missing"


def test_source_never_resolves_outside_the_source_root(case_copy: Path, tmp_path: Path) -> None:
    assert (
        resolve_source(str(case_copy), b"pleadings/complaint.pdf", "")
        == (case_copy / "pleadings/complaint.pdf").resolve()
    )
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, case_copy / "link.txt")
    for raw in (b"../secret.txt", b"link.txt", str(outside).encode()):
        with pytest.raises(PermanentError) as caught:
            resolve_source(str(case_copy), raw, raw.decode())
        assert caught.value.code == "outside_source"
    # A name that is not UTF-8 is read by its raw bytes.
    odd = os.fsencode(case_copy) + b"/caf\xe9.txt"
    with open(odd, "wb") as handle:
        handle.write(b"latin-1 name")
    assert (
        resolve_source(str(case_copy), b"caf\xe9.txt", "caf\ufffd.txt").read_bytes()
        == b"latin-1 name"
    )


# -- chunking and entities ---------------------------------------------------------


def test_chunks_have_exact_offsets_overlap_and_pages(extractor: Extractor) -> None:
    document, _ = extract(extractor, "pleadings/complaint.pdf")
    text = document["text"]
    chunks = chunk_proc.chunk_text(text, document["pages"], size=700, overlap=100)
    assert len(chunks) >= 5
    for previous, chunk in zip(chunks, chunks[1:], strict=False):
        assert chunk["start"] < previous["end"], "consecutive chunks overlap"
        assert chunk["start"] > previous["start"]
    for chunk in chunks:
        assert text[chunk["start"] : chunk["end"]] == chunk["text"]
        assert len(chunk["text"]) <= 700
        assert not chunk["text"][0].isspace() and not chunk["text"][-1].isspace()
    assert chunks[0]["pages"][0] == 1 and chunks[-1]["pages"][1] == 3
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk["start"], chunk["end"]))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_chunking_edge_cases() -> None:
    assert chunk_proc.chunk_text("") == []
    assert chunk_proc.chunk_text("   \n ") == []
    long_word = "x" * 5000
    chunks = chunk_proc.chunk_text(long_word, size=1000, overlap=100)
    assert [c["end"] - c["start"] for c in chunks][:4] == [1000, 1000, 1000, 1000]
    assert chunks[-1]["end"] == 5000
    with pytest.raises(ValueError):
        chunk_proc.chunk_text("abc", size=10, overlap=10)


def test_entities_of_the_complaint(extractor: Extractor) -> None:
    document, _ = extract(extractor, "pleadings/complaint.pdf")
    text = document["text"]
    found = entities_proc.find_entities(text)
    for entity in found:
        assert text[entity["start"] : entity["end"]] == entity["text"]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entity in found:
        by_type.setdefault(entity["type"], []).append(entity)

    case = by_type["case_number"][0]
    assert case["text"] == "2:24-cv-01234"
    assert text[case["start"] - len("Case No. ") : case["end"]] == "Case No. 2:24-cv-01234"

    brown = next(e for e in by_type["citation"] if e.get("plaintiff") == "Brown")
    assert brown["text"] == "Brown v. Board of Education, 347 U.S. 483 (1954)"
    assert (brown["normalized"], brown["defendant"], brown["year"]) == (
        "347 U.S. 483",
        "Board of Education",
        "1954",
    )
    erie = next(e for e in by_type["citation"] if e.get("normalized") == "304 U.S. 64")
    assert (
        words(erie["text"]) == "Erie R.R. Co. v. Tompkins, 304 U.S. 64 (1938)"
    )  # broken across lines
    statutes = {e["normalized"] for e in by_type["citation"] if e["subtype"] == "fulllaw"}
    assert {"28 U.S.C. § 1332", "28 U.S.C. § 1391"} <= statutes

    money = {e["text"]: e["normalized"] for e in by_type["money"]}
    assert money["$250,000.00"] == "250000.00"
    assert isinstance(money["$250,000.00"], str)  # an exact decimal string, never a float
    assert {"$75,000.00", "$48,612.37", "$21,400.00"} <= set(money)

    assert [e["text"] for e in by_type["email"]] == ["apatel@patelinjurylaw.example"]
    assert [(e["text"], e["normalized"]) for e in by_type["phone"]] == [
        ("(215) 555-0143", "2155550143")
    ]
    dates = {e["normalized"] for e in by_type["date"]}
    assert {"2024-03-14", "2024-05-01", "2024-05-06"} <= dates
    # A citation keeps its year: no date entity inside it.
    assert not any(brown["start"] <= e["start"] < brown["end"] for e in by_type["date"])


@pytest.mark.parametrize(
    ("text", "kind", "normalized"),
    [
        ("filed 14 March 2024 in", "date", "2024-03-14"),
        ("due Sept. 3, 2024.", "date", "2024-09-03"),
        ("on 2024-02-30 maybe", "date", None),
        ("paid USD 1,200 today", "money", "1200"),
        ("Docket No. 24-1234 was", "case_number", "24-1234"),
        ("No. 1:23-cr-00042-JDB-2 was", "case_number", "1:23-cr-00042-jdb"),
        ("call +1 215.555.0101 now", "phone", "2155550101"),
        ("write J.Doe+law@Firm.example.com", "email", "j.doe+law@firm.example.com"),
    ],
)
def test_entity_forms(text: str, kind: str, normalized: str | None) -> None:
    found = [e for e in entities_proc.find_entities(text) if e["type"] == kind]
    assert len(found) == 1, found
    assert found[0].get("normalized") == normalized


def test_nothing_found_in_plain_prose() -> None:
    assert entities_proc.find_entities("The quick brown fox jumps over the lazy dog.") == []


def test_eyecite_runs_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("eyecite tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    found = entities_proc.find_entities("See Roe v. Wade, 410 U.S. 113 (1973).")
    assert [e["normalized"] for e in found if e["type"] == "citation"] == ["410 U.S. 113"]


def test_image_bytes_in_memory_work_too(extractor: Extractor) -> None:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (900, 200), 255)
    ImageDraw.Draw(image).text(
        (30, 60), "SETTLEMENT 2024", font=ImageFont.load_default(size=60), fill=0
    )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    from services.worker.processors.base import TextBuilder

    out = TextBuilder()
    usage = Usage()
    assert (
        extractor.extract_into(
            buffer.getvalue(), "image", extractor.context(usage, Deadline(60)), out
        )
        == 1
    )
    assert "SETTLEMENT" in out.text.replace(" ", "")


def test_eml_with_an_unknown_charset_still_yields_its_body(
    extractor: Extractor, tmp_path: Path
) -> None:
    raw = (
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: odd\r\n"
        b'Content-Type: text/plain; charset="x-no-such-charset"\r\n\r\n'
        b"Settlement of $5,000.00 agreed.\r\n"
    )
    (tmp_path / "odd.eml").write_bytes(raw)
    document, _ = extract(extractor, "odd.eml", tmp_path, "email")
    assert "Settlement of $5,000.00 agreed." in document["text"]


def test_a_message_without_headers_is_corrupt(extractor: Extractor, tmp_path: Path) -> None:
    (tmp_path / "not-mail.eml").write_bytes(b"just some words\nand more\n")
    with pytest.raises(PermanentError) as caught:
        extract(extractor, "not-mail.eml", tmp_path, "email")
    assert caught.value.code == "corrupt"
