"""Word (.docx) text: paragraphs and tables in document order (python-docx).

Owns reading a .docx: body paragraphs one per line, tables one row per line
with cells separated by " | " (a merged cell counted once), in the order
they appear. Headers, footers, comments and embedded images are not read.
A file that is not a readable OOXML package is corrupt; an OLE compound
file in place of a .docx is how Office stores an encrypted document, so it
is reported as encrypted. Both permanent.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from services.worker.processors.base import PermanentError, TextBuilder, normalize_newlines

VERSION = "1"
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def _table_lines(table) -> list[str]:  # type: ignore[no-untyped-def]
    lines = []
    for row in table.rows:
        cells: list[str] = []
        seen: set[int] = set()
        for cell in row.cells:
            if id(cell._tc) in seen:  # a merged cell appears once per grid column
                continue
            seen.add(id(cell._tc))
            cells.append(" ".join(cell.text.split()))
        if any(cells):
            lines.append(" | ".join(cells))
    return lines


def extract_docx(source: Path | bytes, out: TextBuilder) -> None:
    """Appends the document's text to `out` as one part."""
    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table
    from lxml.etree import XMLSyntaxError

    head = source[:8] if isinstance(source, bytes) else source.open("rb").read(8)
    if head == OLE_MAGIC:
        raise PermanentError(
            "encrypted", "the Word document is encrypted (an OLE container, not OOXML)"
        )
    stream = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        document = docx.Document(stream)
        lines: list[str] = []
        for block in document.iter_inner_content():
            if isinstance(block, Table):
                lines.extend(_table_lines(block))
            else:
                lines.append(block.text)
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, XMLSyntaxError, ValueError) as exc:
        raise PermanentError(
            "corrupt", f"the Word document cannot be read ({type(exc).__name__}: {exc})"
        ) from exc
    out.write(normalize_newlines("\n".join(lines)).strip("\n"))
