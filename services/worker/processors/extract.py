"""The extract stage: the text of one file, whatever its kind.

Owns the dispatch from a file's plan (or its sniffed content) to the
processor for its kind - PDF text layer with OCR (pdf), Word (word), e-mail
with attachments (mail), text and HTML (text), images (image) - and the
processor version that keys the artifact cache: it changes when any
processor involved changes, and names the OCR engine for the plans that may
need one, so text OCR'd by one engine is never served for another.

Reads the source file only; writes nothing (the runner stores the result).
Before reading, the file is checked: it must exist under the source root
(no `..`, no symlink escaping it - permanent, "outside_source"), be
non-empty (permanent, "empty") and hash to the SHA-256 the manifest
recorded (permanent, "source_changed": the file was replaced after the scan,
so its outputs would be filed under the wrong key).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.worker.processors import image as image_proc
from services.worker.processors import mail as mail_proc
from services.worker.processors import pdf as pdf_proc
from services.worker.processors import text as text_proc
from services.worker.processors import word as word_proc
from services.worker.processors.base import (
    DOCX,
    EMAIL,
    HTML,
    IMAGE,
    NO_DEADLINE,
    OLE,
    PDF,
    TEXT,
    Deadline,
    PermanentError,
    RetryableError,
    TextBuilder,
    Usage,
    sniff,
)
from services.worker.processors.ocr import OcrEngine

NAME = "extract"
VERSION = "1"

PLAN_KINDS = {
    "text_layer": PDF,
    "ocr": PDF,
    "docx": DOCX,
    "email": EMAIL,
    "image": IMAGE,
    "text": TEXT,
}
# Plans whose extraction can never involve OCR.
_NO_OCR_PLANS = {"docx", "text"}
_HASH_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class ExtractContext:
    """What processors share during one extraction."""

    ocr: OcrEngine | None
    dpi: int
    usage: Usage
    deadline: Deadline = NO_DEADLINE
    depth: int = 0

    def nested(self) -> ExtractContext:
        return replace(self, depth=self.depth + 1)


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._+-" else "-" for ch in text)


class Extractor:
    """Runs the processor for a file's kind and assembles the text artifact."""

    name = NAME

    def __init__(self, ocr: OcrEngine | None, dpi: int = 200) -> None:
        self.ocr = ocr
        self.dpi = dpi
        self._code = (
            f"{VERSION}.pdf{pdf_proc.VERSION}.docx{word_proc.VERSION}"
            f".eml{mail_proc.VERSION}.txt{text_proc.VERSION}.img{image_proc.VERSION}"
        )

    def version(self, plan: str) -> str:
        """The processor version of a plan (file-name safe)."""
        if plan in _NO_OCR_PLANS:
            return f"{self._code}+noocr"
        if self.ocr is None:
            return f"{self._code}+ocr-none"
        return _safe_name(f"{self._code}+{self.ocr.name}-{self.ocr.version}")

    def context(self, usage: Usage, deadline: Deadline) -> ExtractContext:
        return ExtractContext(ocr=self.ocr, dpi=self.dpi, usage=usage, deadline=deadline)

    def extract_path(self, path: Path, plan: str, ctx: ExtractContext) -> dict[str, Any]:
        """The text document of the file at `path` (already checked)."""
        with path.open("rb") as handle:
            head = handle.read(8192)
        sniffed, media = sniff(head, path.name)
        if plan == "unsupported":
            raise PermanentError(
                "unsupported", f"the manifest marked this file unsupported ({media})"
            )
        kind = PLAN_KINDS.get(plan, sniffed)
        if kind == TEXT and sniffed == HTML:
            kind, media = HTML, "text/html"
        out = TextBuilder()
        pages, encoding = self._extract(path, kind, sniffed, ctx, out)
        if kind == PDF:
            media = "application/pdf"
        return {
            "media_type": media,
            "kind": kind,
            "encoding": encoding,
            "text": out.text,
            "pages": out.pages,
            "parts": out.parts,
            "warnings": out.warnings,
            "page_count": pages,
        }

    def _extract(
        self, source: Path, kind: str, sniffed: str, ctx: ExtractContext, out: TextBuilder
    ) -> tuple[int, str]:
        if kind in (TEXT, HTML, EMAIL):
            data = source.read_bytes()
            if kind == EMAIL:
                return mail_proc.extract_message(mail_proc.parse(data), ctx, out, self), ""
            text, encoding = text_proc.extract_text(data, html=kind == HTML)
            out.write(text)
            return 0, encoding
        if kind == DOCX and sniffed == OLE:
            raise PermanentError(
                "encrypted", "the Word document is encrypted (an OLE container, not OOXML)"
            )
        return self.extract_into(source, kind, ctx, out), ""

    def extract_into(
        self,
        source: Path | bytes,
        kind: str,
        ctx: ExtractContext,
        out: TextBuilder,
        *,
        part: str = "",
    ) -> int:
        """Appends the text of `source` (of `kind`) to `out`; returns pages read."""
        if kind == PDF:
            return pdf_proc.extract_pdf(source, ctx, out, part=part)
        if kind == IMAGE:
            return image_proc.extract_image(source, ctx, out, part=part)
        if kind == DOCX:
            word_proc.extract_docx(source, out)
            return 0
        data = source if isinstance(source, bytes) else source.read_bytes()
        if kind == EMAIL:
            return mail_proc.extract_message(
                mail_proc.parse(data), ctx, out, self, prefix=f"{part} > " if part else ""
            )
        if kind in (TEXT, HTML):
            text, _ = text_proc.extract_text(data, html=kind == HTML)
            out.write(text)
            return 0
        if kind == OLE:
            raise PermanentError("unsupported", "legacy or encrypted Office file (OLE container)")
        raise PermanentError("unsupported", "no processor for this kind of file")


def resolve_source(source_path: str, raw_path: bytes, relative_path: str) -> Path:
    """The file to read: under `source_path`, never outside it (symlinks resolved)."""
    if not source_path:
        raise PermanentError("outside_source", "the payload names no source directory")
    root = os.path.realpath(os.fsencode(source_path))
    rel = raw_path or os.fsencode(relative_path)
    if not rel:
        raise PermanentError("outside_source", "the payload names no file")
    joined = rel if os.path.isabs(rel) else os.path.join(root, rel)
    real = os.path.realpath(joined)
    if os.path.commonpath([root, real]) != root or real == root:
        raise PermanentError(
            "outside_source", f"{relative_path!r} resolves outside the source directory"
        )
    return Path(os.fsdecode(real))


def check_source(path: Path, sha256: str, deadline: Deadline = NO_DEADLINE) -> int:
    """Size of the file after checking it is a non-empty regular file with hash `sha256`."""
    try:
        stat = path.stat()
    except FileNotFoundError as exc:
        raise RetryableError(
            "source_missing", f"{path.name} is not in the source directory (moved or unmounted?)"
        ) from exc
    except OSError as exc:
        raise RetryableError("unreadable", f"{path.name} cannot be read: {exc.strerror}") from exc
    if not path.is_file():
        raise PermanentError("unsupported", f"{path.name} is not a regular file")
    if stat.st_size == 0:
        raise PermanentError("empty", "the file is empty (0 bytes)")
    if sha256:
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                while block := handle.read(_HASH_BLOCK):
                    digest.update(block)
                    deadline.check()
        except OSError as exc:
            raise RetryableError(
                "unreadable", f"{path.name} cannot be read: {exc.strerror}"
            ) from exc
        if digest.hexdigest() != sha256:
            raise PermanentError(
                "source_changed",
                f"the file changed after the scan (sha256 {digest.hexdigest()[:12]}..., manifest "
                f"{sha256[:12]}...); analyze the folder again",
            )
    return stat.st_size
