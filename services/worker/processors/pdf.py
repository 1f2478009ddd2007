"""PDF text: the text layer of each page (pypdfium2), OCR where a page has none.

Owns reading PDFs page by page: the document is opened from its path (or
from bytes, for e-mail attachments) and pdfium loads pages on demand, so a
multi-GB PDF never sits in memory; each page and text page is closed before
the next. A page is OCR'd when its text layer holds fewer than
`MIN_TEXT_CHARS` visible characters *and* it draws at least one image (a
blank page is not worth an OCR call). Rendering is capped at
`MAX_RENDER_SIDE` pixels per side whatever the page size.

Errors: pdfium's FPDF_ERR_FORMAT (3) is a corrupt file and FPDF_ERR_PASSWORD
(4) / FPDF_ERR_SECURITY (5) an encrypted one - both permanent; anything else
pdfium reports may be passing trouble (I/O) and is retryable.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from services.worker.processors.base import (
    PermanentError,
    RetryableError,
    TextBuilder,
    normalize_newlines,
)

if TYPE_CHECKING:
    from services.worker.processors.extract import ExtractContext

VERSION = "1"
MIN_TEXT_CHARS = 8
MAX_RENDER_SIDE = 5000

_ERR_FORMAT, _ERR_PASSWORD, _ERR_SECURITY = 3, 4, 5


def open_pdf(source: Path | bytes) -> pdfium.PdfDocument:
    """Opens a PDF, mapping pdfium's load errors to stage errors."""
    try:
        return pdfium.PdfDocument(source)
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        if code == _ERR_FORMAT:
            raise PermanentError(
                "corrupt", f"the PDF is corrupt and cannot be opened ({exc})"
            ) from exc
        if code in (_ERR_PASSWORD, _ERR_SECURITY):
            raise PermanentError("encrypted", f"the PDF is password-protected ({exc})") from exc
        raise RetryableError("unreadable", f"pdfium could not load the PDF ({exc})") from exc


def _visible_chars(text: str) -> int:
    return sum(1 for ch in text if not ch.isspace())


def _has_image(page: pdfium.PdfPage) -> bool:
    return (
        next(iter(page.get_objects(filter=(pdfium_c.FPDF_PAGEOBJ_IMAGE,), max_depth=4)), None)
        is not None
    )


def render(page: pdfium.PdfPage, dpi: int):  # type: ignore[no-untyped-def]
    """The page as a grayscale PIL image at `dpi`, capped in size."""
    width, height = page.get_size()
    scale = dpi / 72.0
    longest = max(width, height) * scale
    if longest > MAX_RENDER_SIDE:
        scale *= MAX_RENDER_SIDE / longest
    bitmap = page.render(scale=scale, grayscale=True)
    try:
        return bitmap.to_pil()
    finally:
        bitmap.close()


def extract_pdf(
    source: Path | bytes, ctx: ExtractContext, out: TextBuilder, *, part: str = ""
) -> int:
    """Appends every page's text to `out`; returns the page count."""
    document = open_pdf(source)
    try:
        pages = len(document)
        for index in range(pages):
            ctx.deadline.check()
            page = document[index]
            try:
                textpage = page.get_textpage()
                try:
                    text = normalize_newlines(textpage.get_text_bounded())
                finally:
                    textpage.close()
                source_kind = "text_layer"
                if _visible_chars(text) < MIN_TEXT_CHARS and _has_image(page):
                    if ctx.ocr is None:
                        source_kind = "no_ocr"
                        out.warnings.append(
                            f"{part or 'document'} page {index + 1}: no text layer and OCR is off"
                        )
                    else:
                        image = render(page, ctx.dpi)
                        ocr_text = ctx.ocr.recognize(image)
                        ctx.usage.add_ocr_page(ctx.ocr.service)
                        text = (
                            ocr_text if _visible_chars(ocr_text) >= _visible_chars(text) else text
                        )
                        source_kind = "ocr"
                extra = {"part": part} if part else {}
                out.add_page(text, source_kind, **extra)
            finally:
                page.close()
        return pages
    except pdfium.PdfiumError as exc:
        raise RetryableError("unreadable", f"pdfium failed while reading a page ({exc})") from exc
    finally:
        document.close()
