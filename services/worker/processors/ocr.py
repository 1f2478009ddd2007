"""OCR engines: turn a page image into text, offline by default.

Owns the three engines and the choice among them (`select_engine`):

- `RapidOcrEngine` (default): rapidocr-onnxruntime, whose PP-OCR detection,
  direction and recognition models ship inside the wheel, so it runs with no
  download at run time. The ONNX sessions are built on first use in the
  process that uses them (never before a prefork fork) and kept for the
  life of the process; `threads` bounds onnxruntime's intra-op pool so that
  N prefork children don't each spawn one thread per core.
- `TesseractEngine`: the `tesseract` binary through a subprocess (image on
  stdin, text on stdout), when present on PATH.
- `TextractEngine`: AWS Textract `DetectDocumentText` (boto3), one billed
  call per page; priced as service "aws_textract", the two local engines as
  service "local".

Each engine has a `name` and `version` (part of the extract processor
version, hence of the artifact cache key) and the cost `service` its pages
are charged to. Engines take a PIL image and return text with lines in
reading order; they never read files.
"""

from __future__ import annotations

import importlib.metadata
import io
import logging
import shutil
import subprocess
import threading
from typing import Any, Protocol

from PIL import Image

from services.worker.processors.base import PermanentError, RetryableError

logger = logging.getLogger(__name__)


class OcrEngine(Protocol):
    name: str
    version: str
    # Cost service the pages are charged to ("local", "aws_textract").
    service: str

    def recognize(self, image: Image.Image) -> str: ...


def _boxes_to_text(items: list[tuple[float, float, float, str]]) -> str:
    """Joins (top, bottom, left, text) boxes into lines, top to bottom, left to right."""
    lines: list[list[tuple[float, float, float, str]]] = []
    for box in sorted(items, key=lambda b: (b[0] + b[1]) / 2):
        top, bottom, _, _ = box
        middle = (top + bottom) / 2
        if lines:
            line = lines[-1]
            line_top = min(b[0] for b in line)
            line_bottom = max(b[1] for b in line)
            height = max(1.0, line_bottom - line_top)
            if (
                line_top - 0.25 * height <= middle <= line_bottom + 0.25 * height
                and abs(middle - (line_top + line_bottom) / 2) < 0.5 * height
            ):
                line.append(box)
                continue
        lines.append([box])
    return "\n".join(" ".join(b[3] for b in sorted(line, key=lambda b: b[2])) for line in lines)


class RapidOcrEngine:
    """rapidocr-onnxruntime: offline, models inside the wheel."""

    name = "rapidocr"
    service = "local"
    # Images whose longer side is shorter than this are enlarged first (up to 4x).
    MIN_SIDE = 1600

    def __init__(self, threads: int = 0) -> None:
        self.version = importlib.metadata.version("rapidocr-onnxruntime")
        self.threads = threads
        self._engine: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        try:
            importlib.metadata.version("rapidocr-onnxruntime")
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    def load(self) -> Any:
        """Builds the ONNX sessions once per process (about 0.2 s)."""
        with self._lock:
            if self._engine is None:
                from rapidocr_onnxruntime import RapidOCR

                logging.getLogger("RapidOCR").setLevel(logging.WARNING)
                options: dict[str, Any] = {}
                if self.threads > 0:
                    options = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1}
                self._engine = RapidOCR(**options)
            return self._engine

    def recognize(self, image: Image.Image) -> str:
        import numpy as np

        engine = self.load()
        image = image.convert("RGB")
        longest = max(image.size)
        if 0 < longest < self.MIN_SIDE:
            # Small pictures carry small text, which the recogniser reads without spaces.
            factor = min(4.0, self.MIN_SIDE / longest)
            image = image.resize(
                (round(image.width * factor), round(image.height * factor)), Image.LANCZOS
            )
        array = np.asarray(image)
        result, _ = engine(array)
        items = []
        for box, text, _score in result or []:
            ys = [point[1] for point in box]
            xs = [point[0] for point in box]
            items.append((float(min(ys)), float(max(ys)), float(min(xs)), str(text)))
        return _boxes_to_text(items)


class TesseractEngine:
    """The tesseract binary, image in on stdin, text out on stdout."""

    name = "tesseract"
    service = "local"

    def __init__(
        self, command: str = "tesseract", lang: str = "eng", dpi: int = 200, timeout: float = 300.0
    ) -> None:
        self.command = command
        self.lang = lang
        self.dpi = dpi
        self.timeout = timeout
        self.version = self._version()

    @staticmethod
    def available(command: str = "tesseract") -> bool:
        return shutil.which(command) is not None

    def _version(self) -> str:
        try:
            out = subprocess.run(
                [self.command, "--version"], capture_output=True, timeout=30, check=False
            )
        except OSError:
            return "unknown"
        first = (out.stdout or out.stderr).decode(errors="replace").splitlines()
        return first[0].split()[-1] if first and first[0].split() else "unknown"

    def recognize(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        try:
            out = subprocess.run(
                [self.command, "stdin", "stdout", "-l", self.lang, "--dpi", str(self.dpi)],
                input=buffer.getvalue(),
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RetryableError("ocr_failed", f"tesseract did not run: {exc}") from exc
        if out.returncode != 0:
            raise RetryableError(
                "ocr_failed",
                f"tesseract exited {out.returncode}: "
                f"{out.stderr.decode(errors='replace').strip()[:500]}",
            )
        text = out.stdout.decode("utf-8", errors="replace")
        return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


# Textract error codes after which the same page can never succeed.
_TEXTRACT_PERMANENT = {
    "InvalidParameterException",
    "UnsupportedDocumentException",
    "BadDocumentException",
    "DocumentTooLargeException",
}
TEXTRACT_MAX_BYTES = 10 * 1024 * 1024


class TextractEngine:
    """AWS Textract DetectDocumentText, one synchronous call per page image."""

    name = "textract"
    version = "1"
    service = "aws_textract"

    def __init__(self, region: str = "us-east-1", client: Any = None) -> None:
        if client is None:
            import boto3  # optional: the `aws` extra

            client = boto3.client("textract", region_name=region)
        self.client = client

    def recognize(self, image: Image.Image) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        data = _encode_for_textract(image)
        try:
            response = self.client.detect_document_text(Document={"Bytes": data})
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            detail = exc.response.get("Error", {}).get("Message", "")
            message = f"Textract refused the page: {code}: {detail}"
            if code in _TEXTRACT_PERMANENT:
                raise PermanentError("ocr_rejected", message) from exc
            raise RetryableError("ocr_failed", message) from exc
        except BotoCoreError as exc:
            raise RetryableError("ocr_failed", f"Textract unreachable: {exc}") from exc
        lines = [
            block.get("Text", "")
            for block in response.get("Blocks", [])
            if block.get("BlockType") == "LINE"
        ]
        return "\n".join(line for line in lines if line)


def _encode_for_textract(image: Image.Image) -> bytes:
    """PNG, or JPEG when PNG exceeds Textract's 10 MB synchronous limit."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False)
    if buffer.tell() <= TEXTRACT_MAX_BYTES:
        return buffer.getvalue()
    for quality in (85, 70, 50):
        buffer = io.BytesIO()
        image.convert("L").save(buffer, "JPEG", quality=quality)
        if buffer.tell() <= TEXTRACT_MAX_BYTES:
            return buffer.getvalue()
    raise PermanentError("too_large", "the page image is too large for Textract even as JPEG")


def select_engine(
    name: str,
    *,
    threads: int = 0,
    tesseract_cmd: str = "tesseract",
    tesseract_lang: str = "eng",
    dpi: int = 200,
    textract_region: str = "us-east-1",
    textract_client: Any = None,
) -> OcrEngine | None:
    """The configured engine; `auto` prefers rapidocr, then tesseract, else None."""
    if name == "none":
        return None
    if name in ("auto", "rapidocr") and RapidOcrEngine.available():
        return RapidOcrEngine(threads=threads)
    if name == "rapidocr":
        raise RuntimeError("ocr_engine=rapidocr but rapidocr-onnxruntime is not installed")
    if name in ("auto", "tesseract") and TesseractEngine.available(tesseract_cmd):
        return TesseractEngine(tesseract_cmd, tesseract_lang, dpi)
    if name == "tesseract":
        raise RuntimeError(f"ocr_engine=tesseract but {tesseract_cmd!r} is not on PATH")
    if name == "textract":
        return TextractEngine(textract_region, client=textract_client)
    logger.warning("no OCR engine available: pages without a text layer stay empty")
    return None
