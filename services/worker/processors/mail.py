"""E-mail (.eml): headers, body, and every attachment by its own type.

Owns reading an RFC 5322 message with the stdlib `email` package: the
From/To/Cc/Date/Subject headers, the text/plain body (else the HTML body as
text), then each attachment - sniffed by its bytes, not its name - extracted
by the processor for its kind (a PDF page by page with OCR, a .docx, a nested
message, ...) and appended after a marker line
`===== Attachment N: name (media/type) =====`. Each attachment is recorded
as a part with its character span.

An attachment that is corrupt, encrypted or unsupported does not fail the
message: its marker says why it was not read and a warning is kept. A
retryable failure inside an attachment (an OCR service down) fails the whole
message so that it is tried again. Nesting is bounded by `MAX_DEPTH`.
"""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import TYPE_CHECKING

from services.worker.processors.base import (
    EMAIL,
    PermanentError,
    TextBuilder,
    normalize_newlines,
    sniff,
)
from services.worker.processors.text import html_to_text

if TYPE_CHECKING:
    from services.worker.processors.extract import ExtractContext, Extractor

VERSION = "1"
MAX_DEPTH = 5
HEADERS = ("From", "To", "Cc", "Date", "Subject")


def parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    if not isinstance(message, EmailMessage) or not any(message.get(h) for h in HEADERS):
        raise PermanentError("corrupt", "the e-mail has none of From, To, Cc, Date or Subject")
    return message


def _body_text(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain", "html"))
    if body is None:
        return ""
    try:
        content = body.get_content()
    except (LookupError, ValueError, AssertionError):  # an unknown charset, a bad encoding
        raw = body.get_payload(decode=True) or b""
        content = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    if not isinstance(content, str):
        return ""
    content = normalize_newlines(content)
    return html_to_text(content) if body.get_content_subtype() == "html" else content.strip("\n")


def extract_message(
    message: EmailMessage,
    ctx: ExtractContext,
    out: TextBuilder,
    extractor: Extractor,
    *,
    prefix: str = "",
) -> int:
    """Appends headers, body and attachments to `out`; returns pages read in attachments."""
    start = out.length
    headers = [f"{name}: {message[name]}" for name in HEADERS if message.get(name)]
    out.write("\n".join(headers))
    out.separate()
    out.write(_body_text(message))
    out.add_part(f"{prefix}body", "message/rfc822", start)
    pages = 0
    for number, attachment in enumerate(message.iter_attachments(), start=1):
        ctx.deadline.check()
        label = f"{prefix}attachment {number}"
        name = attachment.get_filename() or f"attachment-{number}"
        content_type = attachment.get_content_type()
        nested = content_type == "message/rfc822"
        if nested:
            inner = attachment.get_payload()
            inner_message = inner[0] if isinstance(inner, list) and inner else None
            data = inner_message.as_bytes() if inner_message is not None else b""
        else:
            raw = attachment.get_payload(decode=True)
            data = raw if isinstance(raw, bytes) else b""
        kind, media = (EMAIL, "message/rfc822") if nested else sniff(data[:8192], name)
        out.separate()
        out.write(f"===== Attachment {number}: {name} ({media}) =====\n")
        part_start = out.length
        try:
            if not data:
                raise PermanentError("empty", "the attachment is empty")
            if ctx.depth >= MAX_DEPTH:
                raise PermanentError("unsupported", f"attachments nested deeper than {MAX_DEPTH}")
            pages += extractor.extract_into(data, kind, ctx.nested(), out, part=f"{label}: {name}")
            status = "extracted"
        except PermanentError as exc:
            out.write(f"[attachment not extracted: {exc.code}: {exc.message}]")
            out.warnings.append(f"{label} ({name}) not extracted: {exc.code}: {exc.message}")
            status = exc.code
        out.add_part(f"{label}: {name}", media, part_start, status=status, filename=name)
    return pages
