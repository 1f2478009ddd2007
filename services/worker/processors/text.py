"""Plain text and HTML: charset detection and HTML-to-text.

Owns decoding bytes of unknown encoding: UTF-8 (with or without BOM) when it
decodes strictly, else the best guess of charset-normalizer over the first
MiB (cp1252 winning near-ties), decoded with replacement characters for the
odd bad byte. Bytes no encoding explains are not text (permanent,
"unsupported"). HTML becomes text with the stdlib parser: head, scripts and
styles dropped, block elements on their own lines, table cells separated by
" | ", entities unescaped, runs of blanks (nbsp included) made one space.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from services.worker.processors.base import PermanentError, normalize_newlines

VERSION = "1"
SAMPLE = 1024 * 1024
WESTERN = "cp1252"
NEAR_TIE = 0.1

_BLOCK = {
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "tr",
    "table",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "section",
    "article",
    "header",
    "footer",
    "blockquote",
    "pre",
    "hr",
    "title",
    "dl",
    "dt",
    "dd",
    "address",
    "figure",
    "figcaption",
    "main",
    "nav",
    "aside",
    "form",
    "fieldset",
}
_SKIP = {
    "script",
    "style",
    "noscript",
    "template",
    "svg",
    "head",
}  # head: its title repeats the body


def decode(data: bytes) -> tuple[str, str]:
    """(text, encoding name) of `data`."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace"), "utf-8-sig"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data[:SAMPLE]))
    if not matches:
        raise PermanentError(
            "unsupported", "the file is not text in any encoding charset-normalizer knows"
        )
    best = matches[0]
    # Short Western text often fits a Baltic or Central European code page as well
    # as cp1252; US and EU legal files are far more often cp1252, so it wins near-ties.
    western = next((m for m in matches if m.encoding == WESTERN), None)
    if (
        western is not None
        and western.chaos <= best.chaos + NEAR_TIE
        and western.coherence >= best.coherence - NEAR_TIE
    ):
        best = western
    return data.decode(best.encoding, errors="replace"), best.encoding


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.pre = 0
        self.title_seen = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif tag == "pre":
            self.pre += 1
        if tag in ("td", "th"):
            self.out.append(" | ")
        elif tag in _BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK:
            self.out.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("br", "hr"):
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    text = "".join(parser.out)
    lines = [re.sub(r"^\s*\|\s*", "", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def extract_text(data: bytes, *, html: bool) -> tuple[str, str]:
    """(text, encoding) of a text or HTML file's bytes."""
    text, encoding = decode(data)
    text = normalize_newlines(text)
    return (html_to_text(text) if html else text), encoding
