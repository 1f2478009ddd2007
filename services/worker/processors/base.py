"""The vocabulary every processor shares: errors, usage, deadlines, sniffing.

Owns the two error classes a stage can end with (`PermanentError`: trying
again cannot help - corrupt, encrypted, unsupported, empty; `RetryableError`:
anything that may pass next time), the `Usage` counters a processor fills in
as it goes (so work done before a failure is still charged), the cooperative
`Deadline` processors check between pages (a run must not outlive its
lease), and content sniffing by magic bytes (used for e-mail attachments and
when a payload carries no plan). No I/O beyond the bytes handed in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class StageError(Exception):
    """A stage failed; `code` is stable (e.g. "corrupt"), the message says why."""

    permanent = False

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PermanentError(StageError):
    """Trying again cannot help: corrupt, encrypted, unsupported, empty."""

    permanent = True


class RetryableError(StageError):
    """The same run may succeed later: I/O trouble, a dependency down, a timeout."""


@dataclass
class Usage:
    """Billable work a processor did, counted as it happens."""

    # Pages OCR'd, by cost-service service name ("local", "aws_textract").
    ocr_pages: dict[str, int] = field(default_factory=dict)

    def add_ocr_page(self, service: str, pages: int = 1) -> None:
        self.ocr_pages[service] = self.ocr_pages.get(service, 0) + pages

    @property
    def total_ocr_pages(self) -> int:
        return sum(self.ocr_pages.values())


class Deadline:
    """A monotonic point in time a run must finish by; `check()` raises past it."""

    def __init__(self, seconds: float | None) -> None:
        self.expires = None if seconds is None else time.monotonic() + max(0.0, seconds)
        self._stopped: StageError | None = None

    def remaining(self) -> float | None:
        return None if self.expires is None else self.expires - time.monotonic()

    def stop(self, error: StageError) -> None:
        """Makes every later `check()` raise `error` (the run is no longer wanted)."""
        self._stopped = error

    def check(self) -> None:
        if self._stopped is not None:
            raise self._stopped
        if self.expires is not None and time.monotonic() > self.expires:
            raise RetryableError(
                "lease_expired",
                "the run outlived its lease and stopped; a new attempt will redo it",
            )


NO_DEADLINE = Deadline(None)

# Kinds a file can be (what the extract processors dispatch on).
PDF, DOCX, EMAIL, IMAGE, TEXT, HTML, OLE, UNKNOWN = (
    "pdf",
    "docx",
    "email",
    "image",
    "text",
    "html",
    "ole",
    "unknown",
)

_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"BM", "image/bmp"),
)

_EMAIL_HEADERS = (
    b"from:",
    b"to:",
    b"subject:",
    b"date:",
    b"received:",
    b"return-path:",
    b"message-id:",
    b"mime-version:",
    b"delivered-to:",
    b"x-",
    b"cc:",
    b"reply-to:",
)


def sniff(head: bytes, name: str = "") -> tuple[str, str]:
    """(kind, media type) of content from its first bytes (8 KiB is plenty)."""
    if head.startswith(b"%PDF-") or b"%PDF-" in head[:1024]:
        return PDF, "application/pdf"
    if head.startswith(b"PK\x03\x04"):
        if b"word/" in head or name.lower().endswith(".docx"):
            return DOCX, "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        return UNKNOWN, "application/zip"
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return OLE, "application/x-ole-storage"
    for magic, media in _IMAGE_MAGIC:
        if head.startswith(magic):
            return IMAGE, media
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return IMAGE, "image/webp"
    if b"\x00" in head[:4096]:
        return UNKNOWN, "application/octet-stream"
    lowered = head[:2048].lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered[:512]:
        return HTML, "text/html"
    first = lowered.split(b"\n", 1)[0]
    if first.startswith(_EMAIL_HEADERS) and b":" in first and _looks_like_headers(lowered):
        return EMAIL, "message/rfc822"
    return TEXT, "text/plain"


def _looks_like_headers(head: bytes) -> bool:
    """Several `Name: value` lines before the first blank line."""
    block = head.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    lines = [line for line in block.split(b"\n") if line and not line[:1].isspace()]
    named = sum(1 for line in lines if b":" in line and b" " not in line.split(b":", 1)[0])
    return named >= 2 and named == len(lines)


def normalize_newlines(text: str) -> str:
    """\\r\\n and \\r become \\n; NULs are dropped."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


class TextBuilder:
    """Concatenates extracted pieces, remembering each page's and part's offsets.

    Offsets are Python string indices (code points) into the final text,
    which is what the chunk and entities stages refer back to.
    """

    PAGE_SEPARATOR = "\n\n"

    def __init__(self) -> None:
        self._pieces: list[str] = []
        self.length = 0
        self.pages: list[dict[str, object]] = []
        self.parts: list[dict[str, object]] = []
        self.warnings: list[str] = []

    def write(self, text: str) -> tuple[int, int]:
        start = self.length
        if text:
            self._pieces.append(text)
            self.length += len(text)
        return start, self.length

    def separate(self) -> None:
        """Ends the current block with a blank line (unless at the start)."""
        if self.length and not self.text_endswith("\n\n"):
            self.write("\n\n" if not self.text_endswith("\n") else "\n")

    def text_endswith(self, suffix: str) -> bool:
        tail = "".join(self._pieces[-2:])
        return tail.endswith(suffix)

    def add_page(self, text: str, source: str, **extra: object) -> None:
        self.separate()
        start, end = self.write(text.strip("\n"))
        self.pages.append(
            {"number": len(self.pages) + 1, "start": start, "end": end, "source": source, **extra}
        )

    def add_part(self, label: str, media_type: str, start: int, **extra: object) -> None:
        self.parts.append(
            {"label": label, "media_type": media_type, "start": start, "end": self.length, **extra}
        )

    @property
    def text(self) -> str:
        return "".join(self._pieces)
