"""What a file is: content type from magic bytes, category, priority and plan.

Owns the rules that turn facts about a file into decisions, as pure
functions (no I/O, no SQL, no gRPC): `sniff` reads the first bytes of a
file and names its MIME type and type family; `extension_mismatch` says
when the name suggests another family than the content; `Categorizer`
maps folder names to a category and a processing priority through a
configurable table; `plan_for` picks the processing plan; `hidden_reason`
says why a hidden or system file is excluded.

Sniffing is by content, never by extension. The common types of a legal
case (PDF, Office Open XML, e-mail, text, raster images) are recognised by
an inline table, which costs a microsecond or two per file; anything else
falls back to the `filetype` package (pure Python, audio/video/archive
signatures), which costs ~20-40 us and so is only asked when the table
has no answer. The inline table exists for speed on 100,000-file scans
(see bench/manifest_scan.py), not because a library was missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import filetype

# How many leading bytes `sniff` wants (more is fine, less may miss a type).
SNIFF_BYTES = 8192

FAMILIES = ("pdf", "word", "email", "text", "image", "audio", "video", "archive", "other")

MIME_PDF = "application/pdf"
MIME_DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
MIME_XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
MIME_PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
MIME_OOXML_ENCRYPTED = "application/x-ooxml-encrypted"
MIME_CFB = "application/x-ole-storage"
MIME_DOC = "application/msword"
MIME_EML = "message/rfc822"
MIME_TEXT = "text/plain"
MIME_HTML = "text/html"
MIME_RTF = "application/rtf"
MIME_ZIP = "application/zip"
MIME_UNKNOWN = "application/octet-stream"

# family of each MIME type the inline table or the fallback can produce.
_FAMILY_OF_MIME = {
    MIME_PDF: "pdf",
    MIME_DOCX: "word",
    MIME_DOC: "word",
    MIME_RTF: "word",
    MIME_OOXML_ENCRYPTED: "word",
    MIME_EML: "email",
    "application/vnd.ms-outlook": "email",
    MIME_TEXT: "text",
    MIME_HTML: "text",
    MIME_ZIP: "archive",
}

# Inline signatures at offset 0: (prefix, mime).
_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"{\\rtf", MIME_RTF),
    (b"\x1f\x8b", "application/gzip"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"BZh", "application/x-bzip2"),
    (b"\xfd7zXZ\x00", "application/x-xz"),
    (b"ID3", "audio/mpeg"),
    (b"OggS", "audio/ogg"),
    (b"fLaC", "audio/flac"),
    (b"\x1aE\xdf\xa3", "video/x-matroska"),
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "video/x-ms-asf"),
    (b"\x00\x00\x01\xba", "video/mpeg"),
    (b"\x00\x00\x01\xb3", "video/mpeg"),
    (b"8BPS", "image/vnd.adobe.photoshop"),
    (b"\x7fELF", "application/x-executable"),
    (b"SQLite format 3\x00", "application/vnd.sqlite3"),
)

# Extensions whose expected family is known, for `extension_mismatch`.
EXTENSION_FAMILY = {
    "pdf": "pdf",
    "docx": "word", "doc": "word", "rtf": "word", "docm": "word",
    "eml": "email", "msg": "email",
    "txt": "text", "text": "text", "md": "text", "csv": "text", "log": "text",
    "htm": "text", "html": "text", "xml": "text", "json": "text",
    "png": "image", "jpg": "image", "jpeg": "image", "gif": "image", "tif": "image",
    "tiff": "image", "bmp": "image", "webp": "image", "heic": "image",
    "mp3": "audio", "wav": "audio", "m4a": "audio", "flac": "audio", "ogg": "audio",
    "aac": "audio", "wma": "audio",
    "mp4": "video", "mov": "video", "avi": "video", "mkv": "video", "wmv": "video",
    "webm": "video", "m4v": "video", "mpg": "video", "mpeg": "video",
    "zip": "archive", "gz": "archive", "7z": "archive", "rar": "archive", "tar": "archive",
}

# Extensions that promise a type docimport processes: content of an unknown
# type under one of these names is a damaged file, not an unsupported one.
PROCESSABLE_EXTENSIONS = {"pdf": "PDF", "docx": "Word document", "eml": "e-mail"}

# Header names that make a text file an RFC 5322 message.
_MAIL_HEADERS = (
    b"from", b"to", b"subject", b"date", b"message-id", b"received", b"return-path",
    b"mime-version", b"cc", b"reply-to", b"delivered-to", b"x-mailer", b"content-type",
)
_MAIL_HEADER_SET = frozenset(_MAIL_HEADERS)
_HEADER_LINE = re.compile(rb"^([A-Za-z0-9][A-Za-z0-9-]*):[ \t]", re.MULTILINE)


@dataclass(frozen=True)
class ContentType:
    mime: str
    family: str


def family_of(mime: str) -> str:
    if mime in _FAMILY_OF_MIME:
        return _FAMILY_OF_MIME[mime]
    major = mime.partition("/")[0]
    if major in ("image", "audio", "video"):
        return major
    if mime.startswith("text/"):
        return "text"
    if mime in ("application/gzip", "application/x-7z-compressed", "application/vnd.rar",
                "application/x-tar", "application/x-bzip2", "application/x-xz"):
        return "archive"
    return "other"


def sniff(head: bytes) -> ContentType:
    """The content type of a file whose first bytes are `head`.

    An empty `head` is `application/x-empty` (family other). A ZIP is only
    known as Word/Excel/PowerPoint when the member names show in `head`;
    `content.py` looks into the central directory when they do not.
    """
    if not head:
        return _EMPTY
    if head.startswith(b"%PDF-"):
        return _PDF
    if head.startswith(b"PK\x03\x04"):
        return content_type(_zip_kind(head))
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        if "EncryptedPackage".encode("utf-16-le") in head:
            return content_type(MIME_OOXML_ENCRYPTED)
        if "WordDocument".encode("utf-16-le") in head:
            return content_type(MIME_DOC)
        return content_type(MIME_CFB)
    for prefix, found in _BY_FIRST_BYTE.get(head[0], ()):
        if head.startswith(prefix):
            return found
    media = _media_kind(head)
    if media is not None:
        return content_type(media)
    # A PDF after some leading junk (the one-byte search first: it is a memchr).
    if head.find(b"%", 0, 1024) >= 0 and head.find(b"%PDF-", 0, 1024) >= 0:
        return _PDF
    text = _text_kind(head)
    if text is not None:
        return content_type(text)
    guess = filetype.guess(head)
    if guess is not None:
        return content_type(guess.mime)
    return content_type(MIME_UNKNOWN)


_CONTENT_TYPES: dict[str, ContentType] = {}


def content_type(mime: str) -> ContentType:
    """The (shared, immutable) ContentType of a MIME type."""
    found = _CONTENT_TYPES.get(mime)
    if found is None:
        found = ContentType(mime, family_of(mime))
        if len(_CONTENT_TYPES) < 1024:
            _CONTENT_TYPES[mime] = found
    return found


_PDF = ContentType(MIME_PDF, "pdf")
_EMPTY = ContentType("application/x-empty", "other")
_BY_FIRST_BYTE: dict[int, list[tuple[bytes, ContentType]]] = {}
for _prefix, _mime in _PREFIXES:
    _BY_FIRST_BYTE.setdefault(_prefix[0], []).append((_prefix, ContentType(_mime, family_of(_mime))))


_FTYP_BRANDS = {
    b"qt  ": "video/quicktime", b"M4A ": "audio/mp4", b"M4B ": "audio/mp4",
    b"heic": "image/heic", b"heix": "image/heic", b"mif1": "image/heif", b"avif": "image/avif",
    b"3gp4": "video/3gpp", b"3gp5": "video/3gpp",
}
_RIFF_FORMS = {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}


def _media_kind(head: bytes) -> str | None:
    """Containers recognised by a tag at an offset (ISO BMFF, RIFF, MPEG audio, tar)."""
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], "video/mp4")
    first = head[0]
    if first in _MEDIA_FIRST_BYTES:  # the tests below that are tied to the first byte
        if head[:4] == b"RIFF":
            return _RIFF_FORMS.get(head[8:12])
        if head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
            return "audio/mpeg"
    if head[257:262] == b"ustar":
        return "application/x-tar"
    if first in _MEDIA_FIRST_BYTES:
        if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
            return "image/bmp"
        if head[:2] == b"MZ" and b"\x00" in head[:64]:
            return "application/x-msdownload"
    return None


_MEDIA_FIRST_BYTES = frozenset(b"R\xffBM")


def _zip_kind(head: bytes) -> str:
    if b"word/" in head:
        return MIME_DOCX
    if b"xl/" in head:
        return MIME_XLSX
    if b"ppt/" in head:
        return MIME_PPTX
    if head[30:38] == b"mimetype" and b"opendocument" in head[:200]:
        return "application/vnd.oasis.opendocument"
    return MIME_ZIP


def zip_kind_from_names(names: Iterable[str]) -> str:
    """The MIME type of a ZIP from its member names (central directory)."""
    found = MIME_ZIP
    for name in names:
        if name == "word/document.xml":
            return MIME_DOCX
        if name.startswith("xl/"):
            found = MIME_XLSX
        elif name.startswith("ppt/"):
            found = MIME_PPTX
    return found


def _text_kind(head: bytes) -> str | None:
    """text/plain, text/html or message/rfc822 when `head` is text, else None."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return MIME_TEXT  # UTF-16 with a byte-order mark
    if b"\x00" in head:
        return None
    sample = head.lstrip(b"\xef\xbb\xbf")
    try:
        if not sample.isascii():  # ASCII is UTF-8; isascii() is a scan, decode() builds a str
            sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the end of `head` is still text.
        if exc.start < len(sample) - 4:
            if not _mostly_printable(sample):
                return None
    opening = sample[:512].lstrip()  # lower() works byte by byte: the first 14 bytes are enough
    if opening[:1] == b"<" and opening[:14].lower().startswith((b"<!doctype html", b"<html")):
        return MIME_HTML
    if _looks_like_mail(sample):
        return MIME_EML
    return MIME_TEXT


def _mostly_printable(sample: bytes) -> bool:
    """Legacy 8-bit text (Latin-1, cp1252): few control bytes."""
    controls = sum(1 for b in sample[:4096] if b < 9 or 13 < b < 32 or b == 127)
    return controls * 100 <= len(sample[:4096])


def _looks_like_mail(sample: bytes) -> bool:
    """The text opens with a header block holding at least two mail headers."""
    end = sample.find(b"\n", 0, 1000)
    first = sample[: end if end >= 0 else 1000]
    # a header line holds a ':' (a one-byte search rules most text out before the regex)
    if not ((b":" in first and _HEADER_LINE.match(first)) or first.startswith(b"From ")):
        return False
    stop = 4096  # the header block: up to the first blank line, within 4 KiB
    for separator in (b"\r\n\r\n", b"\n\n"):
        found = sample.find(separator, 0, stop)
        if found >= 0:
            stop = found
    seen: set[bytes] = set()
    for match in _HEADER_LINE.finditer(sample, 0, stop):
        name = match.group(1).lower()
        if name in _MAIL_HEADER_SET:
            seen.add(name)
            if len(seen) >= 2:
                return True
    return False


_EXTENSIONS: dict[bytes, str] = {}


def extension_of(name: bytes) -> str:
    """Lower-case extension without the dot ('' when none)."""
    stem, dot, ext = name.rpartition(b"/")[2].rpartition(b".")
    if not dot or not stem.lstrip(b"."):
        return ""
    known = _EXTENSIONS.get(ext)
    if known is None:
        known = ext.decode("utf-8", "replace").lower()
        if len(_EXTENSIONS) < 4096:
            _EXTENSIONS[ext] = known
    return known


def extension_mismatch(name: bytes, content: ContentType) -> bool:
    """True when the extension promises another family than the content has."""
    expected = EXTENSION_FAMILY.get(extension_of(name))
    if expected is None or expected == content.family or content.mime == "application/x-empty":
        return False
    return not (expected == "text" and content.family == "email")  # a message saved as .txt is text


# ----------------------------------------------------------------- hidden files

_SYSTEM_NAMES = {
    b".ds_store": "macOS folder metadata (.DS_Store)",
    b"thumbs.db": "Windows thumbnail cache (Thumbs.db)",
    b"ehthumbs.db": "Windows thumbnail cache (ehthumbs.db)",
    b"desktop.ini": "Windows folder settings (desktop.ini)",
    b"icon\r": "macOS folder icon (Icon\\r)",
    b".localized": "macOS localisation marker (.localized)",
}


_SYSTEM_NAME_LENGTHS = frozenset(len(name) for name in _SYSTEM_NAMES)


def may_be_hidden(name: bytes) -> bool:
    """False when `hidden_reason(name)` is surely None outside hidden folders (a cheap first test)."""
    return name[:1] in (b".", b"~") or len(name) in _SYSTEM_NAME_LENGTHS


def hidden_reason(name: bytes, *, in_hidden_folder: bytes | None = None) -> str | None:
    """Why a file is excluded as hidden or system, or None when it is not."""
    lowered = name.lower()
    if lowered in _SYSTEM_NAMES:
        return f"system file: {_SYSTEM_NAMES[lowered]}"
    if name.startswith(b"~$"):
        return "Office lock file (~$...): a temporary file of an open document"
    if name.startswith(b"._"):
        return "macOS resource fork (._ file)"
    if in_hidden_folder is not None:
        folder = in_hidden_folder.decode("utf-8", "backslashreplace")
        return f"inside hidden folder {folder}"
    if name.startswith(b"."):
        return "hidden file (name starts with '.')"
    return None


# ----------------------------------------------------------------- categories

MISCELLANEOUS = "miscellaneous"

DEFAULT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "pleadings": ("pleadings", "pleading", "complaint", "complaints", "answer", "answers",
                  "motion", "motions", "brief", "briefs", "orders", "filings", "court_filings"),
    "discovery": ("discovery", "interrogatories", "interrogatory", "production",
                  "productions", "requests", "rfp", "rfa", "subpoena", "subpoenas"),
    "correspondence": ("correspondence", "letters", "letter", "emails", "email", "mail",
                       "communications"),
    "medical_records": ("medical_records", "medical", "medical_bills", "hospital",
                        "health_records", "treatment"),
    "depositions": ("depositions", "deposition", "depo", "depos", "transcripts",
                    "transcript"),
    "expert_reports": ("expert_reports", "expert", "experts", "expert_report"),
    "financial_records": ("financial_records", "financial", "financials", "finance", "bank",
                          "banking", "billing", "invoices", "tax", "taxes", "payroll", "wages"),
    "exhibits": ("exhibits", "exhibit", "trial_exhibits"),
}

# Lower runs first.
DEFAULT_PRIORITIES: dict[str, int] = {
    "pleadings": 10,
    "depositions": 20,
    "expert_reports": 30,
    "medical_records": 40,
    "discovery": 50,
    "correspondence": 60,
    "financial_records": 70,
    "exhibits": 80,
    MISCELLANEOUS: 100,
}

_NORMALISE = re.compile(r"[^a-z0-9]+")


def _normalise(folder: str) -> str:
    return _NORMALISE.sub("_", folder.lower()).strip("_")


class Categorizer:
    """Folder names -> category and priority, through a configurable table.

    A file's category is that of its nearest folder whose normalised name
    (lower case, runs of other characters as '_') is, or has as one of its
    '_'-separated words, an alias of a category; else `miscellaneous`.
    "02 - Medical Records" -> medical_records, "discovery/depositions" ->
    depositions.
    """

    def __init__(
        self,
        categories: Mapping[str, Sequence[str]] | None = None,
        priorities: Mapping[str, int] | None = None,
    ) -> None:
        table = dict(DEFAULT_CATEGORIES if categories is None else categories)
        self._aliases: dict[str, str] = {}
        for category, aliases in table.items():
            for alias in (category, *aliases):
                self._aliases.setdefault(_normalise(alias), category)
        self._priorities = {**DEFAULT_PRIORITIES, **(priorities or {})}
        self._cache: dict[tuple[str, ...], str] = {}

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self._aliases.values(), MISCELLANEOUS]))

    def category(self, folders: tuple[str, ...]) -> str:
        """Category of a file under `folders` (relative folder names, outermost first)."""
        cached = self._cache.get(folders)
        if cached is not None:
            return cached
        found = MISCELLANEOUS
        for folder in reversed(folders):
            name = _normalise(folder)
            hit = self._aliases.get(name)
            if hit is None:
                for word in name.split("_"):
                    hit = self._aliases.get(word)
                    if hit is not None:
                        break
            if hit is not None:
                found = hit
                break
        self._cache[folders] = found
        return found

    def priority(self, category: str) -> int:
        return self._priorities.get(category, self._priorities[MISCELLANEOUS])


# ----------------------------------------------------------------- plans

_PLAN_OF_FAMILY = {"word": "docx", "email": "email", "text": "text", "image": "image"}

# Families and types docimport reads; everything else is listed as unsupported.
SUPPORTED_MIMES = {MIME_PDF, MIME_DOCX, MIME_EML, MIME_TEXT, MIME_HTML}


def plan_for(content: ContentType, ocr_page_count: int) -> str:
    """The processing plan of a file of this type (see common.v1.ProcessingPlan)."""
    if content.mime == MIME_PDF:
        return "ocr" if ocr_page_count > 0 else "text_layer"
    if content.family == "image":
        return "image"
    if content.mime in SUPPORTED_MIMES:
        return _PLAN_OF_FAMILY[content.family]
    return "unsupported"


def unsupported_message(content: ContentType) -> str:
    if content.mime == MIME_DOC:
        return "legacy Word .doc is not processed (convert it to .docx)"
    if content.family in ("audio", "video"):
        return f"{content.family} files are not processed ({content.mime})"
    if content.family == "archive":
        return f"archives are not unpacked ({content.mime}); extract them into the folder"
    if content.mime == MIME_UNKNOWN:
        return "the content is of no known type"
    return f"files of type {content.mime} are not processed"
