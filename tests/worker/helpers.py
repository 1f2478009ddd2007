"""Builders shared by the worker tests: payloads for sample-case files."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

from services.common.tasks import StagePayload, encode_raw_path

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_CASE = ROOT / "examples" / "sample-case"

PLANS = {
    "pleadings/complaint.pdf": "text_layer",
    "pleadings/answer.pdf": "text_layer",
    "discovery/interrogatories.docx": "docx",
    "discovery/scanned_deposition_excerpt.pdf": "ocr",
    "discovery/site_photo.png": "image",
    "correspondence/letter_to_counsel.eml": "email",
    "correspondence/call_notes.txt": "text",
    "medical_records/er_visit_summary.pdf": "text_layer",
    "medical_records/er_visit_summary_copy.pdf": "text_layer",
    "medical_records/corrupt_scan.pdf": "text_layer",
    "medical_records/sealed_records.pdf": "text_layer",
}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def payload(
    relative: str,
    stage: str = "extract",
    *,
    root: Path = SAMPLE_CASE,
    plan: str | None = None,
    session_id: str | None = None,
    document_id: str | None = None,
    attempt: int = 1,
    **extra: Any,
) -> StagePayload:
    path = root / relative
    return StagePayload(
        session_id=session_id or str(uuid.uuid4()),
        document_id=document_id or str(uuid.uuid4()),
        stage=stage,
        attempt=attempt,
        source_path=str(root),
        relative_path=relative,
        raw_path_b64=encode_raw_path(os.fsencode(relative)),
        sha256=sha256_of(path) if path.is_file() else "0" * 64,
        size_bytes=path.stat().st_size if path.is_file() else 0,
        plan=plan or PLANS.get(relative, "text"),
        category=relative.split("/", 1)[0],
        **extra,
    )
