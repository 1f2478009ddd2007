"""The chunk stage's splitter: text into overlapping chunks with character offsets.

Owns how text is cut: chunks of about `size` characters, each ending at the
best boundary in its last half (a blank line, else a line end, else a
sentence end, else a space), each starting `overlap` characters before the
previous one ended (moved forward to a word start), with leading and
trailing blanks left out of the span. `start`/`end` are Python string
offsets into the extracted text, so `text[start:end] == chunk["text"]`.
Each chunk also names the pages it spans when the text has pages.
"""

from __future__ import annotations

import bisect
import re
from typing import Any

NAME = "chunk"
VERSION = "1"

_SENTENCE_END = re.compile(r"[.!?][\"')\]]?\s")


def _break_at(text: str, start: int, limit: int) -> int:
    """The best end for a chunk starting at `start` that must end by `limit`."""
    floor = start + max(1, (limit - start) // 2)
    for separator in ("\n\n", "\n"):
        at = text.rfind(separator, floor, limit)
        if at != -1:
            return at + len(separator)
    best = -1
    for match in _SENTENCE_END.finditer(text, floor, limit):
        best = match.end()
    if best != -1:
        return best
    at = max(text.rfind(" ", floor, limit), text.rfind("\t", floor, limit))
    return at + 1 if at != -1 else limit


def chunk_text(
    text: str, pages: list[dict[str, Any]] | None = None, *, size: int = 2000, overlap: int = 200
) -> list[dict[str, Any]]:
    """The chunks of `text`; empty text gives no chunks."""
    if size <= 0 or overlap < 0 or overlap >= size:
        raise ValueError("need size > 0 and 0 <= overlap < size")
    starts = [int(p["start"]) for p in pages or []]
    chunks: list[dict[str, Any]] = []
    position, length = 0, len(text)
    while position < length:
        limit = min(position + size, length)
        end = limit if limit == length else _break_at(text, position, limit)
        lo, hi = position, end
        while lo < hi and text[lo].isspace():
            lo += 1
        while hi > lo and text[hi - 1].isspace():
            hi -= 1
        if hi > lo:
            chunk: dict[str, Any] = {
                "index": len(chunks),
                "start": lo,
                "end": hi,
                "text": text[lo:hi],
            }
            last = bisect.bisect_right(starts, hi - 1) - 1
            if pages and last >= 0:  # text before the first page (an e-mail body) has none
                first = max(0, bisect.bisect_right(starts, lo) - 1)
                chunk["pages"] = [int(pages[first]["number"]), int(pages[last]["number"])]
            chunks.append(chunk)
        if end >= length:
            break
        if overlap:
            following = max(end - overlap, position + 1)
            # Start the overlap at a word boundary, never past the chunk's end.
            breaks = [
                b
                for b in (text.find(" ", following, end), text.find("\n", following, end))
                if b != -1
            ]
            following = min(breaks) + 1 if breaks else following
        else:
            following = end
        position = max(following, position + 1)
    return chunks
