"""The three stages as the runner sees them: a version, an input, an artifact body.

Owns what each stage reads and what its artifact holds, and therefore the
cache key `(source sha256, stage, processor version)`:

- extract: reads the source file (checked: under the source root, non-empty,
  same SHA-256 as scanned); its version is the extractor's for the plan.
- chunk and entities: read the extract artifact of the same sha256 from
  the artifact store (the version this worker would have produced, else the
  payload's `options["extract_version"]`, else the newest stored one) and
  work on its text; their version is their own plus the extract version they
  consumed, so new extraction never serves stale chunks.

Artifact bodies are JSON objects; offsets in chunks and entities are
Python string offsets into the extract artifact's `text`. No network and no
reporting here: `services.worker.runner` does that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.tasks import StagePayload
from services.worker.artifacts import ArtifactStore
from services.worker.processors import chunk as chunk_proc
from services.worker.processors import entities as entities_proc
from services.worker.processors.base import Deadline, RetryableError, Usage
from services.worker.processors.extract import Extractor, check_source, resolve_source

ARTIFACT_KINDS = {"extract": "text", "chunk": "chunks", "entities": "entities"}


@dataclass(frozen=True)
class Prepared:
    """What a run will produce: its processor version and the input it reads."""

    version: str
    input_version: str = ""


@dataclass
class StageOutput:
    body: dict[str, Any]
    stats: dict[str, int] = field(default_factory=dict)


class Stage(Protocol):
    name: str
    processor: str

    def prepare(self, payload: StagePayload) -> Prepared: ...

    def run(
        self, payload: StagePayload, prepared: Prepared, usage: Usage, deadline: Deadline
    ) -> StageOutput: ...


class ExtractStage:
    name = "extract"

    def __init__(self, extractor: Extractor) -> None:
        self.extractor = extractor
        self.processor = extractor.name

    def prepare(self, payload: StagePayload) -> Prepared:
        return Prepared(self.extractor.version(payload.plan))

    def run(
        self, payload: StagePayload, prepared: Prepared, usage: Usage, deadline: Deadline
    ) -> StageOutput:
        path = resolve_source(payload.source_path, payload.raw_path, payload.relative_path)
        check_source(path, payload.sha256, deadline)
        body = self.extractor.extract_path(
            path, payload.plan, self.extractor.context(usage, deadline)
        )
        stats = {
            "pages": int(body["page_count"]),
            "ocr_pages": usage.total_ocr_pages,
            "characters": len(body["text"]),
        }
        return StageOutput(body, stats)


class _FromExtract:
    """A stage that reads the extract artifact of the same source."""

    name = ""

    def __init__(self, store: ArtifactStore, extractor: Extractor) -> None:
        self.store = store
        self.extractor = extractor

    def _input_version(self, payload: StagePayload) -> str:
        stored = self.store.versions(payload.sha256, "extract")
        for wanted in (
            self.extractor.version(payload.plan),
            str(payload.options.get("extract_version", "")),
        ):
            if wanted and wanted in stored:
                return wanted
        if stored:
            return stored[0]
        raise RetryableError(
            "input_missing", f"no extract artifact for sha256 {payload.sha256[:12]}... in the store"
        )

    def _load_text(self, payload: StagePayload, prepared: Prepared) -> dict[str, Any]:
        stored = self.store.get(payload.sha256, "extract", prepared.input_version)
        if stored is None:
            raise RetryableError(
                "input_missing",
                f"extract artifact {prepared.input_version} vanished from the store",
            )
        body = json.loads(stored.data)
        body["_ref"] = {"uri": stored.ref.uri, "sha256": stored.ref.sha256}
        return body

    @staticmethod
    def _input(source: dict[str, Any], prepared: Prepared) -> dict[str, Any]:
        return {"stage": "extract", "version": prepared.input_version, **source["_ref"]}


class ChunkStage(_FromExtract):
    name = "chunk"
    processor = chunk_proc.NAME

    def __init__(
        self, store: ArtifactStore, extractor: Extractor, *, size: int, overlap: int
    ) -> None:
        super().__init__(store, extractor)
        self.size = size
        self.overlap = overlap

    def prepare(self, payload: StagePayload) -> Prepared:
        source = self._input_version(payload)
        return Prepared(f"{chunk_proc.VERSION}.s{self.size}.o{self.overlap}+{source}", source)

    def run(
        self, payload: StagePayload, prepared: Prepared, usage: Usage, deadline: Deadline
    ) -> StageOutput:
        source = self._load_text(payload, prepared)
        deadline.check()
        chunks = chunk_proc.chunk_text(
            source["text"], source.get("pages"), size=self.size, overlap=self.overlap
        )
        body = {
            "input": self._input(source, prepared),
            "size": self.size,
            "overlap": self.overlap,
            "chunks": chunks,
        }
        return StageOutput(body, {"chunks": len(chunks), "characters": len(source["text"])})


class EntitiesStage(_FromExtract):
    name = "entities"
    processor = entities_proc.NAME

    def prepare(self, payload: StagePayload) -> Prepared:
        source = self._input_version(payload)
        own = f"{entities_proc.VERSION}.eyecite-{entities_proc.eyecite_version()}"
        return Prepared(f"{own}+{source}", source)

    def run(
        self, payload: StagePayload, prepared: Prepared, usage: Usage, deadline: Deadline
    ) -> StageOutput:
        source = self._load_text(payload, prepared)
        deadline.check()
        found = entities_proc.find_entities(source["text"])
        counts: dict[str, int] = {}
        for entity in found:
            counts[entity["type"]] = counts.get(entity["type"], 0) + 1
        body = {"input": self._input(source, prepared), "counts": counts, "entities": found}
        return StageOutput(body, {"entities": len(found), "characters": len(source["text"])})
