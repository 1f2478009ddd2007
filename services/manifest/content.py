"""Reads one file's content: SHA-256, type, PDF pages, e-mail family, problems.

Runs inside the scan's worker processes (see `scanner.py`); owns no state
beyond a per-process read buffer, and imports nothing of gRPC or asyncpg so
the workers stay light. Tasks and results are plain tuples: they cross a
process boundary 100,000 times in a big scan, and tuples pickle several
times faster than dataclasses.

Reading rules: a file is opened once, by the real path the walker vetted
(inside the scanned folder), with O_NOFOLLOW and O_NONBLOCK (a FIFO or a
device swapped in after the walk can never block a worker), and is then
known by its `fstat`: the walk does not stat regular files (see
`scanner.py`), so the size, the mtime and the regular-file check come from
here. Its (device, inode) is checked against the walk's (the folder's
device and the directory entry's inode); when they differ (overlayfs and
bind mounts can report another inode in a listing than in a stat) the file
still counts as the one walked when `/proc/self/fd` shows it was opened at
exactly the vetted path, i.e. no symlink was swapped into the path since.
Files up to `WHOLE_READ_BYTES` are read in one call into a per-process
buffer and inspected from memory (one read for hash, type and pages; a
fresh `bytes` per file costs more than the hashing of a 25 KiB file, in
page faults); larger ones are hashed through a 1 MiB buffer and inspected
by seeking, so a multi-GB file is never held in memory. In a batch of more
than one file, a file over `WHOLE_READ_BYTES` is not read but handed back
(problem `HANDED_BACK`): the scanner sends it again alone, so big files are
hashed in parallel instead of one after another in one worker.

Pages: PDFium opens the document (error 4 or 5: encrypted, any other:
corrupt) and loads each page; a page has a text layer when it holds a text
object (also inside form XObjects). That is the exact count of pages that
need OCR, at a third of the cost of building PDFium text pages. A large PDF
is opened by PDFium through `/proc/self/fd` (see `_large_pdf_pages`).
"""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import errno
import hashlib
import io
import os
import stat
import zipfile
from collections.abc import Iterator
from typing import Any

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_raw

from services.manifest import classify
from services.manifest.classify import SNIFF_BYTES

WHOLE_READ_BYTES = 16 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
MAX_EMAIL_PARSE_BYTES = 512 * 1024 * 1024

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(
    os, "O_CLOEXEC", 0
)

# Result tuple fields (see `inspect_file`); R_MTIME is appended by `inspect_batch`.
R_ORDINAL, R_SIZE, R_SHA256, R_MIME, R_FAMILY, R_MISMATCH = 0, 1, 2, 3, 4, 5
R_PAGES, R_OCR_PAGES, R_PROBLEM, R_MESSAGE, R_EXCLUDED_TYPE, R_ATTACHMENTS, R_MTIME = 6, 7, 8, 9, 10, 11, 12

# R_PROBLEM of a big file in a batch of several: not read, to be sent again alone.
HANDED_BACK = "handed_back"

# Attachment tuple: (index, name, size, sha256, mime, family, mismatch, pages,
# ocr_pages, problem, message)

_buffer: bytearray | None = None
_whole: bytearray | None = None


def _chunk_buffer() -> memoryview:
    global _buffer
    if _buffer is None:
        _buffer = bytearray(CHUNK_BYTES)
    return memoryview(_buffer)


def _whole_buffer() -> memoryview:
    global _whole
    if _whole is None:
        _whole = bytearray(WHOLE_READ_BYTES)
    return memoryview(_whole)


def inspect_batch(
    tasks: list[tuple[int, bytes, bytes, int, int]],
    exclude_families: frozenset[str],
    max_bytes: int,
) -> list[tuple[Any, ...]]:
    """Inspects each (ordinal, path, name, dev, ino) of a batch, in order (see `inspect_file`)."""
    alone = len(tasks) == 1
    return [inspect_file(t, exclude_families, max_bytes, alone) for t in tasks]


def _result(ordinal: int, size: int, sha: str | None, content: classify.ContentType, mismatch: bool,
            pages: int = 0, ocr: int = 0, problem: str | None = None, message: str | None = None,
            excluded: bool = False, attachments: tuple[Any, ...] | None = None) -> tuple[Any, ...]:
    return (ordinal, size, sha, content.mime, content.family, mismatch, pages, ocr, problem,
            message, excluded, attachments)


_NOTHING = classify.ContentType("", "other")


def inspect_file(
    task: tuple[int, bytes, bytes, int, int],
    exclude_families: frozenset[str],
    max_bytes: int,
    alone: bool = True,
) -> tuple[Any, ...]:
    """The result tuple (fields R_*, mtime last) of one file; never raises for the file's faults.

    `dev`/`ino` are what the walk saw; `alone` is False in a batch of several
    (a big file is then handed back unread).
    """
    ordinal, path, name, dev, ino = task
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        kind, message = _open_error(exc)
        size, mtime = _lstat(path)
        return (*_result(ordinal, size, None, _NOTHING, False, problem=kind, message=message), mtime)
    try:
        st = os.fstat(fd)
        mtime = st.st_mtime
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):
            return (*_result(ordinal, size, None, _NOTHING, False, problem="not_a_file",
                             message=f"{kind_of(st.st_mode)}: not read"), mtime)
        if (st.st_ino != ino or st.st_dev != dev) and not _opened_at(fd, path):
            return (*_result(ordinal, size, None, _NOTHING, False, problem="unreadable",
                             message="the file was replaced during the scan; scan again"), mtime)
        if size <= WHOLE_READ_BYTES:
            return (*_inspect_small(fd, ordinal, name, size, exclude_families, max_bytes), mtime)
        if not alone:
            return (*_result(ordinal, size, None, _NOTHING, False, problem=HANDED_BACK), mtime)
        return (*_inspect_large(fd, ordinal, name, size, exclude_families, max_bytes), mtime)
    except OSError as exc:
        return (*_result(ordinal, size, None, _NOTHING, False, problem="unreadable",
                         message=f"read error: {exc.strerror or exc}"), None)
    finally:
        os.close(fd)


def _lstat(path: bytes) -> tuple[int, float | None]:
    """(size, mtime) of a file that could not be opened, as far as they can be known."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0, None
    return st.st_size, st.st_mtime


def _opened_at(fd: int, path: bytes) -> bool:
    """True when `fd` was opened at exactly `path` (Linux: /proc/self/fd; elsewhere: unknown, False)."""
    try:
        return os.readlink(b"/proc/self/fd/%d" % fd) == path
    except OSError:
        return False


_KIND_NAMES = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def kind_of(mode: int) -> str:
    """What a non-regular file is, for a `not_a_file` message."""
    for test, name in _KIND_NAMES:
        if test(mode):
            return name
    return "not a regular file"


def _open_error(exc: OSError) -> tuple[str, str]:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "unreadable", "permission denied: the scanner may not read this file"
    if exc.errno == errno.ENOENT:
        return "unreadable", "the file disappeared during the scan"
    if exc.errno == errno.ELOOP:
        return "not_a_file", "became a symbolic link during the scan; not followed"
    return "unreadable", f"cannot open: {exc.strerror or exc}"


def _read_into(fd: int, view: memoryview) -> int:
    """Reads until `view` is full or EOF; the count read."""
    got = os.readv(fd, [view])
    while got and got < len(view):  # a short read: keep going until EOF
        more = os.readv(fd, [view[got:]])
        if not more:
            break
        got += more
    return got


def _inspect_small(fd: int, ordinal: int, name: bytes, size: int,
                   exclude_families: frozenset[str], max_bytes: int) -> tuple[Any, ...]:
    if size:
        view = _whole_buffer()
        size = _read_into(fd, view[:size])
        data = view[:size]
        head = bytes(data[:SNIFF_BYTES])
    else:
        data = memoryview(b"")
        head = b""
    content = classify.sniff(head)
    mismatch = classify.extension_mismatch(name, content)
    family = content.family
    if family in exclude_families:
        return _result(ordinal, size, None, content, mismatch, excluded=True)
    if size > max_bytes:
        return _too_large(ordinal, size, content, mismatch, max_bytes)
    sha = hashlib.sha256(data).hexdigest()
    if family in _PLAIN_FAMILIES and content.mime in _PLAIN_MIMES and size:
        # The bulk of a case folder: nothing to check beyond the type.
        return (ordinal, size, sha, content.mime, family, mismatch, _PLAIN_FAMILIES[family],
                _PLAIN_FAMILIES[family], None, None, False, None)
    return _details(ordinal, size, sha, name, content, mismatch, bytes(data), None)


# Types whose only check is their sniffed type; value: their pages (and OCR pages).
_PLAIN_FAMILIES = {"text": 0, "image": 1}
_PLAIN_MIMES = {classify.MIME_TEXT, classify.MIME_HTML, "image/png", "image/jpeg", "image/gif",
                "image/tiff", "image/bmp", "image/webp"}


def _inspect_large(fd: int, ordinal: int, name: bytes, size: int,
                   exclude_families: frozenset[str], max_bytes: int) -> tuple[Any, ...]:
    head = os.pread(fd, classify.SNIFF_BYTES, 0)
    content = classify.sniff(head)
    mismatch = classify.extension_mismatch(name, content)
    if content.family in exclude_families:
        return _result(ordinal, size, None, content, mismatch, excluded=True)
    if size > max_bytes:
        return _too_large(ordinal, size, content, mismatch, max_bytes)
    view = _chunk_buffer()
    digest = hashlib.sha256()
    total = 0
    with io.FileIO(fd, "rb", closefd=False) as stream:
        while True:
            n = stream.readinto(view)
            if not n:
                break
            digest.update(view[:n])
            total += n
        stream.seek(0)
        return _details(ordinal, total, digest.hexdigest(), name, content, mismatch, None, stream)


def _too_large(ordinal: int, size: int, content: classify.ContentType, mismatch: bool,
               max_bytes: int) -> tuple[Any, ...]:
    return _result(ordinal, size, None, content, mismatch, problem="too_large",
                   message=f"{size:,} bytes is over the limit of {max_bytes:,} bytes; not hashed")


def _details(ordinal: int, size: int, sha: str, name: bytes, content: classify.ContentType,
             mismatch: bool, data: bytes | None, stream: io.FileIO | None) -> tuple[Any, ...]:
    """Type-specific checks of a hashed file (from `data`, or from `stream` when large)."""
    if size == 0:
        return _result(ordinal, 0, sha, content, mismatch, problem="empty",
                       message="the file is empty (0 bytes)")
    content, pages, ocr, problem, message = _check_content(content, name, data, stream)
    attachments = None
    if content.mime == classify.MIME_EML and problem is None and size <= MAX_EMAIL_PARSE_BYTES:
        raw = data if data is not None else _read_stream(stream)
        attachments, pages, ocr = _attachments(raw)
    if content.family == "image" and problem is None:
        pages, ocr = 1, 1
    return _result(ordinal, size, sha, content, mismatch, pages, ocr, problem, message,
                   attachments=attachments)


def _read_stream(stream: io.FileIO | None) -> bytes:
    assert stream is not None
    stream.seek(0)
    return stream.readall()


_FD_PATHS = os.path.isdir("/proc/self/fd")


def _native_path(stream: io.FileIO) -> str | None:
    """A path that reopens the very file `stream` has open (Linux: /proc/self/fd), else None."""
    return f"/proc/self/fd/{stream.fileno()}" if _FD_PATHS else None


def _large_pdf_pages(stream: io.FileIO | None) -> tuple[int, int, str | None, str | None]:
    """`pdf_pages` of a PDF too large to hold in memory, read natively where possible.

    Handed a Python stream, PDFium reads through a callback into Python for
    every block, which costs more than hashing the file (0.24 s against 0.2 s
    for 300 scanned pages of 1 MiB); handed `/proc/self/fd/N` it reopens the
    very file the worker opened and checked (the same inode, whatever has
    happened to its path since) and reads it in C (0.05 s). Without /proc,
    or when it cannot be opened (a restricted /proc), the stream.
    """
    assert stream is not None
    path = _native_path(stream)
    if path is not None:
        try:
            return pdf_pages(path)
        except OSError:
            pass
    return pdf_pages(stream)


def _check_content(content: classify.ContentType, name: bytes, data: bytes | None,
                   stream: io.FileIO | None
                   ) -> tuple[classify.ContentType, int, int, str | None, str | None]:
    """(content, pages, ocr pages, problem kind, problem message) of a non-empty file."""
    mime = content.mime
    if mime == classify.MIME_PDF:
        pages, ocr, problem, message = pdf_pages(data) if data is not None else _large_pdf_pages(stream)
        return content, pages, ocr, problem, message
    if mime in (classify.MIME_ZIP, classify.MIME_DOCX, classify.MIME_XLSX, classify.MIME_PPTX):
        return _check_zip(content, name, data, stream)
    if mime == classify.MIME_OOXML_ENCRYPTED:
        return content, 0, 0, "encrypted", "password-protected Office document: it cannot be read without the password"
    if mime == classify.MIME_UNKNOWN:
        ext = classify.extension_of(name)
        if ext in classify.PROCESSABLE_EXTENSIONS:
            kind = classify.PROCESSABLE_EXTENSIONS[ext]
            return content, 0, 0, "corrupt", f"named .{ext} but the content is not a {kind} (unrecognised binary data)"
    if classify.plan_for(content, 0) == "unsupported":
        return content, 0, 0, "unsupported", classify.unsupported_message(content)
    return content, 0, 0, None, None


def _check_zip(content: classify.ContentType, name: bytes, data: bytes | None,
               stream: io.FileIO | None
               ) -> tuple[classify.ContentType, int, int, str | None, str | None]:
    source: Any = io.BytesIO(data) if data is not None else stream
    try:
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError):
        if content.mime == classify.MIME_DOCX or classify.extension_of(name) == "docx":
            docx = classify.ContentType(classify.MIME_DOCX, "word")
            return docx, 0, 0, "corrupt", "not a readable Word document: the ZIP container is broken"
        return content, 0, 0, "unsupported", classify.unsupported_message(content)
    mime = classify.zip_kind_from_names(names)
    found = classify.ContentType(mime, classify.family_of(mime))
    if content.mime == classify.MIME_DOCX and mime != classify.MIME_DOCX:
        return content, 0, 0, "corrupt", "not a readable Word document: word/document.xml is missing"
    if mime == classify.MIME_DOCX:
        return found, 0, 0, None, None
    return found, 0, 0, "unsupported", classify.unsupported_message(found)


# ----------------------------------------------------------------- PDF

_TEXT = pdfium_raw.FPDF_PAGEOBJ_TEXT
_FORM = pdfium_raw.FPDF_PAGEOBJ_FORM


PAGES_PER_OPEN = 32


def pdf_pages(source: Any) -> tuple[int, int, str | None, str | None]:
    """(pages, pages without a text layer, problem kind, message) of a PDF.

    PDFium keeps every object it has loaded (a scanned page's image stream
    too) until the document is closed: a 300 MiB scan of 300 pages grew a
    reader by 300 MiB. So the document is closed and opened again every
    `PAGES_PER_OPEN` pages, and a reader holds a few pages at a time,
    whatever the size of the PDF.
    """
    try:
        doc = pdfium.PdfDocument(source)
    except pdfium.PdfiumError as exc:
        code = exc.err_code
        if code in (pdfium_raw.FPDF_ERR_PASSWORD, pdfium_raw.FPDF_ERR_SECURITY):
            return 0, 0, "encrypted", "password-protected PDF: it cannot be opened without the password"
        return 0, 0, "corrupt", f"not a readable PDF (PDFium error {code}: {exc})"
    try:
        count = len(doc)
        if count == 0:
            return 0, 0, "corrupt", "the PDF has no pages"
        ocr = 0
        for index in range(count):
            if index and index % PAGES_PER_OPEN == 0:
                doc.close()
                doc = pdfium.PdfDocument(source)
            page = pdfium_raw.FPDF_LoadPage(doc.raw, index)
            if not page:
                return count, 0, "corrupt", f"page {index + 1} of {count} cannot be read"
            try:
                if not _has_text(page, pdfium_raw.FPDFPage_CountObjects, pdfium_raw.FPDFPage_GetObject):
                    ocr += 1
            finally:
                pdfium_raw.FPDF_ClosePage(page)
        return count, ocr, None, None
    finally:
        doc.close()


def _has_text(holder: Any, count_objects: Any, get_object: Any, depth: int = 0) -> bool:
    get_type = pdfium_raw.FPDFPageObj_GetType
    forms = []
    for index in range(count_objects(holder)):
        obj = get_object(holder, index)
        kind = get_type(obj)
        if kind == _TEXT:
            return True
        if kind == _FORM:
            forms.append(obj)
    if depth < 8:
        for form in forms:
            if _has_text(form, pdfium_raw.FPDFFormObj_CountObjects,
                         pdfium_raw.FPDFFormObj_GetObject, depth + 1):
                return True
    return False


# ----------------------------------------------------------------- e-mail

_MAIL_PARSER = email.parser.BytesParser(policy=email.policy.compat32)


def _header_block(raw: bytes) -> bytes:
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(separator, 0, 1 << 20)
        if end >= 0:
            return raw[:end]
    return raw[: 1 << 16]


def _leaf_parts(message: Any) -> Iterator[Any]:
    """Leaf parts of a multipart message; an attached message is one leaf."""
    for part in message.get_payload():
        if part.get_content_type() == "message/rfc822":
            yield part
        elif part.is_multipart():
            yield from _leaf_parts(part)
        else:
            yield part


def _filename(part: Any, index: int) -> str:
    try:
        name = part.get_filename()
    except Exception:  # noqa: BLE001
        name = None
    if name and "=?" in name:
        try:
            name = str(email.header.make_header(email.header.decode_header(name)))
        except Exception:  # noqa: BLE001
            pass
    if not name and part.get_content_type() == "message/rfc822":
        name = f"attachment-{index}.eml"
    name = (name or f"attachment-{index}").replace("/", "_").replace("\\", "_").replace("\x00", "_")
    return name


def _attachments(raw: bytes) -> tuple[tuple[Any, ...], int, int]:
    """The attachments of a message, and their pages and OCR pages added up.

    Parsed with the compat32 policy (9x faster than the default policy);
    only messages whose headers say multipart can have attachments.
    """
    if b"multipart/" not in _header_block(raw).lower():
        return (), 0, 0
    try:
        message = _MAIL_PARSER.parsebytes(raw)
        leaves = list(_leaf_parts(message)) if message.is_multipart() else []
    except Exception:  # noqa: BLE001 - a malformed message still lists as a file
        return (), 0, 0
    found = []
    pages = ocr = 0
    index = 0
    for part in leaves:
        is_message = part.get_content_type() == "message/rfc822"
        disposition = str(part.get("Content-Disposition", "")).strip().lower()
        if not (is_message or disposition.startswith("attachment") or part.get_param("filename", header="content-disposition") or part.get_param("name")):
            continue
        index += 1
        filename = _filename(part, index)
        try:
            if is_message:
                payload = part.get_payload()
                inner = payload[0] if isinstance(payload, list) and payload else None
                data = inner.as_bytes() if inner is not None else b""
            else:
                data = part.get_payload(decode=True) or b""
        except Exception:  # noqa: BLE001
            data = b""
        item = inspect_bytes(data, filename.encode("utf-8", "surrogateescape"))
        found.append((index, filename, *item))
        if item[7] is None:  # (size, sha, mime, family, mismatch, pages, ocr, problem, message)
            pages += item[5]
            ocr += item[6]
    return tuple(found), pages, ocr


def inspect_bytes(data: bytes, name: bytes) -> tuple[Any, ...]:
    """(size, sha256, mime, family, mismatch, pages, ocr, problem, message) of in-memory content."""
    content = classify.sniff(data[: classify.SNIFF_BYTES])
    mismatch = classify.extension_mismatch(name, content)
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return (0, sha, content.mime, content.family, mismatch, 0, 0, "empty",
                "the attachment is empty (0 bytes)")
    content, pages, ocr, problem, message = _check_content(content, name, data, None)
    if content.family == "image" and problem is None:
        pages, ocr = 1, 1
    return (len(data), sha, content.mime, content.family, mismatch, pages, ocr, problem, message)
