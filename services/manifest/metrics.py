"""The manifest service's Prometheus metrics (on top of `services.common.metrics`).

Owns these families, updated by the analyzer when a scan job ends:

- `docimport_scans_total{outcome}`: scans by outcome (`ready`, `failed`);
- `docimport_scan_duration_seconds`: wall time of the scan itself (hash,
  classify, count pages), not the wait for a scan slot nor the pricing;
- `docimport_scanned_files_total{problem}` and
  `docimport_scanned_bytes_total`: files a scan listed, by the problem it
  found (`none` for a healthy file), and their bytes.

Nothing here is read on scrape: manifests are short-lived jobs whose
results users see through the manifest itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.metrics import STAGE_BUCKETS, ServiceMetrics


class ManifestMetrics(ServiceMetrics):
    """The manifest service's registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        scans = Counter("docimport_scans", "Scans that ended, by outcome.", ["outcome"], registry=r)
        self.scans = {outcome: scans.labels(outcome) for outcome in ("ready", "failed")}
        self.scan_duration = Histogram(
            "docimport_scan_duration_seconds", "Wall time of scans (hash, classify, count pages).",
            buckets=STAGE_BUCKETS, registry=r,
        )
        self._files = Counter("docimport_scanned_files", "Files listed by scans, by the problem found.",
                              ["problem"], registry=r)
        self.scanned_bytes = Counter("docimport_scanned_bytes", "Bytes of the files listed by scans.",
                                     registry=r)

    def scanned(self, files: Iterable[Any], seconds: float) -> None:
        """A scan finished: its duration and its files (`model.ManifestFile`s)."""
        self.scan_duration.observe(seconds)
        by_problem: dict[str, int] = {}
        size = 0
        for f in files:
            key = f.problem_kind or "none"
            by_problem[key] = by_problem.get(key, 0) + 1
            size += f.size_bytes
        for problem, count in by_problem.items():
            self._files.labels(problem).inc(count)
        self.scanned_bytes.inc(size)
