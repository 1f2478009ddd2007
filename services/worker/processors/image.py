"""Raster images (PNG, JPEG, TIFF, ...): every frame through OCR.

Owns opening an image with Pillow (lazily, from its path or bytes) and
OCR'ing each frame as one page; a multi-page TIFF is several pages. An
image Pillow cannot identify is corrupt; one above Pillow's decompression
bomb limit is refused as too large; with no OCR engine configured an image
cannot be read at all (permanent, "ocr_unavailable"). All permanent.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from services.worker.processors.base import PermanentError, RetryableError, TextBuilder

if TYPE_CHECKING:
    from services.worker.processors.extract import ExtractContext

VERSION = "1"


def extract_image(
    source: Path | bytes, ctx: ExtractContext, out: TextBuilder, *, part: str = ""
) -> int:
    """Appends each frame's OCR text to `out` as a page; returns the frame count."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    if ctx.ocr is None:
        raise PermanentError(
            "ocr_unavailable", "an image needs OCR and no OCR engine is configured"
        )
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except UnidentifiedImageError as exc:
        raise PermanentError("corrupt", f"the image cannot be decoded ({exc})") from exc
    except Image.DecompressionBombError as exc:
        raise PermanentError("too_large", str(exc)) from exc
    except OSError as exc:
        raise RetryableError("unreadable", f"the image cannot be read ({exc})") from exc
    frames = 0
    try:
        for frame in ImageSequence.Iterator(image):
            ctx.deadline.check()
            try:
                page = frame.convert("RGB")
            except (OSError, SyntaxError) as exc:
                raise PermanentError(
                    "corrupt", f"frame {frames + 1} cannot be decoded ({exc})"
                ) from exc
            text = ctx.ocr.recognize(page)
            ctx.usage.add_ocr_page(ctx.ocr.service)
            frames += 1
            extra = {"part": part} if part else {}
            out.add_page(text, "ocr", **extra)
    finally:
        image.close()
    return frames
