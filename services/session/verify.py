"""VerifySession: proves a session did what it says, or says what is wrong.

Owns the checks and the verdict; reads through the store, the manifest
service (the file list) and the cost service (the ledger); writes nothing.
No SQL here.

Checks:
- every manifest file is accounted for: one document per file, and each
  document completed, skipped (duplicate or excluded, with its reason) or
  failed with a reason; a document the manifest does not list is an error;
- every completed document has exactly one succeeded run per stage, and
  every artifact those runs reported exists with its size (and, deep,
  re-hashes to its SHA-256) - `services.common.artifacts.verify_artifact`;
- the session's counters equal a recount of its documents, and its stage
  counts a recount of its stage runs;
- every succeeded run has its artifact and its actual cost events in the
  ledger;
- one money truth: every run (whatever became of it) was charged in the
  ledger what it says it cost, the session's cost is the ledger's total, and
  so is its budget's spent amount.

Verdict: FAIL on any error finding, or when fewer than 90% of the
processable files completed; WARN on warnings, documents still in
progress, or under 95%; else PASS. Processable files are the manifest's
files minus the skipped ones and minus the files the scan itself found
broken (corrupt, encrypted, empty...), which must end as permanent failures
carrying the scan's reason: such a failure is the correct outcome, reported
as INFO, not held against the import. `completeness_percent` stays what the
proto says: completed plus skipped over all manifest files.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from services.common import artifacts as artifact_store
from services.session import states as st
from services.session.peers import CostPeer, ManifestPeer, PeerFailure, describe
from services.session.store import SessionInfo, SessionStore

logger = logging.getLogger(__name__)

INFO, WARNING, ERROR = "info", "warning", "error"
PASS, WARN, FAIL = "pass", "warn", "fail"
MAX_IDS = 20
PASS_AT, WARN_AT = 95.0, 90.0


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str
    message: str
    count: int = 0
    document_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyReport:
    session_id: str
    verdict: str
    manifest_files: int
    completed: int
    skipped: int
    failed: int
    unaccounted: int
    in_progress: int
    findings: tuple[Finding, ...]
    recommendations: tuple[str, ...]
    completeness_percent: float
    actual_cost: Decimal | None
    estimated_cost: Decimal | None


@dataclass
class _Bucket:
    ids: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, document_id: str) -> None:
        self.count += 1
        if len(self.ids) < MAX_IDS:
            self.ids.append(document_id)


class Verifier:
    def __init__(
        self,
        store: SessionStore,
        manifest: ManifestPeer | None,
        cost: CostPeer | None,
        *,
        page_size: int = 1000,
        artifact_concurrency: int = 8,
    ) -> None:
        self._store = store
        self._manifest = manifest
        self._cost = cost
        self._page_size = page_size
        self._concurrency = artifact_concurrency

    async def verify(self, session_id: str, *, deep: bool = False) -> VerifyReport:
        session = await self._store.get_session(session_id)
        findings: list[Finding] = []
        recommendations: list[str] = []
        buckets: dict[str, _Bucket] = defaultdict(_Bucket)

        # -- the manifest's files
        manifest_ids: set[str] | None = None
        if self._manifest is not None:
            try:
                manifest_ids = set()
                async for page in self._manifest.iter_files(session.manifest_id, self._page_size):
                    manifest_ids.update(f.file_id for f in page)
            except PeerFailure as exc:
                manifest_ids = None
                findings.append(
                    Finding(
                        WARNING,
                        "manifest_unavailable",
                        f"the manifest's file list could not be read ({describe(exc)}); "
                        "documents were checked against the session only",
                    )
                )
        # -- documents
        counts: Counter[str] = Counter()
        completed_ids: set[str] = set()
        seen_files: set[str] = set()
        failure_patterns: Counter[tuple[str, str, str]] = Counter()
        input_problems: Counter[str] = Counter()
        async for page in self._store.iter_documents(session_id):
            for doc in page:
                counts[doc.state] += 1
                seen_files.add(doc.manifest_file_id)
                if manifest_ids is not None and doc.manifest_file_id not in manifest_ids:
                    buckets["unknown_file"].add(doc.document_id)
                if doc.state == st.COMPLETED:
                    completed_ids.add(doc.document_id)
                elif doc.state == st.SKIPPED:
                    if not doc.skip_reason:
                        buckets["skipped_without_reason"].add(doc.document_id)
                    elif doc.skip_reason.startswith("duplicate"):
                        buckets["duplicates"].add(doc.document_id)
                    elif doc.skip_reason.startswith("e-mail attachment"):
                        buckets["attachments"].add(doc.document_id)
                    else:
                        buckets["excluded"].add(doc.document_id)
                elif doc.state == st.FAILED:
                    failure_patterns[
                        (doc.error_class or "", doc.error_code or "", doc.mime_type)
                    ] += 1
                    if not doc.error_message:
                        buckets["failed_without_reason"].add(doc.document_id)
                    elif doc.problem_kind and doc.error_class == st.PERMANENT:
                        buckets["input_problem"].add(doc.document_id)
                        input_problems[doc.problem_kind] += 1
                    elif doc.error_class == st.PERMANENT:
                        buckets["permanent_failure"].add(doc.document_id)
                    else:
                        buckets["retryable_failure"].add(doc.document_id)
                elif doc.state == st.CANCELLED:
                    buckets["cancelled"].add(doc.document_id)
                else:
                    buckets["in_progress"].add(doc.document_id)
        manifest_total = len(manifest_ids) if manifest_ids is not None else session.total_documents
        unaccounted = (
            len(manifest_ids - seen_files)
            if manifest_ids is not None
            else max(0, session.total_documents - sum(counts.values()))
        )

        # -- stage runs and artifacts of completed documents
        stages_done: dict[str, Counter[str]] = defaultdict(Counter)
        succeeded_runs: list[tuple[str, str, int, bool]] = []
        run_costs: dict[tuple[str, str, int], Decimal] = {}
        artifacts: list[tuple[str, dict]] = []
        async for page in self._store.iter_runs(session_id):
            for run in page:
                run_costs[run.document_id, run.stage, run.attempt] = run.cost or Decimal(0)
                if run.state != st.RUN_SUCCEEDED:
                    continue
                if not run.artifacts:
                    buckets["run_without_artifact"].add(run.document_id)
                stages_done[run.document_id][run.stage] += 1
                succeeded_runs.append((run.document_id, run.stage, run.attempt, run.cache_hit))
                if run.document_id in completed_ids:
                    artifacts.extend((run.document_id, a) for a in run.artifacts)
        from services.common.tasks import STAGES

        for document_id in completed_ids:
            done = stages_done.get(document_id, Counter())
            if any(done[s] == 0 for s in STAGES):
                buckets["missing_stage_run"].add(document_id)
            if any(done[s] > 1 for s in STAGES):
                buckets["duplicate_stage_run"].add(document_id)
        with_artifacts = {d for d, _ in artifacts}
        for document_id in completed_ids - with_artifacts:
            buckets["no_artifacts"].add(document_id)
        for document_id, check in await self._check_artifacts(artifacts, deep):
            buckets[f"artifact_{check.code}"].add(document_id)
            if buckets[f"artifact_{check.code}"].count == 1:
                logger.info("artifact check failed: %s", check.message)

        # -- counters
        recount = await self._store.recount(session_id)
        stored = session.counts.as_dict()
        drift = {k: (stored[k], v) for k, v in recount.as_dict().items() if stored[k] != v}
        drift.update(await self._store.stage_count_drift(session_id))

        # -- the money
        actual_cost = await self._check_money(
            session, succeeded_runs, run_costs, buckets, findings, recommendations
        )

        # -- findings
        def add(code: str, severity: str, message: str) -> None:
            bucket = buckets.get(code)
            if bucket and bucket.count:
                findings.append(
                    Finding(
                        severity,
                        code,
                        message.format(n=bucket.count),
                        bucket.count,
                        tuple(bucket.ids),
                    )
                )

        if unaccounted:
            findings.append(
                Finding(
                    ERROR,
                    "unaccounted_files",
                    f"{unaccounted} manifest files have no document in the session",
                    unaccounted,
                )
            )
            recommendations.append("Create a new session from the manifest for the missing files.")
        add("unknown_file", ERROR, "{n} documents are not files of the session's manifest")
        add("failed_without_reason", ERROR, "{n} documents failed without an error message")
        add("skipped_without_reason", ERROR, "{n} documents were skipped without a reason")
        add(
            "missing_stage_run", ERROR, "{n} completed documents lack a succeeded run of some stage"
        )
        add(
            "duplicate_stage_run",
            ERROR,
            "{n} completed documents have two succeeded runs of one stage",
        )
        add(
            "artifact_missing",
            ERROR,
            "{n} completed documents have an artifact that does not exist",
        )
        add(
            "artifact_size_mismatch",
            ERROR,
            "{n} completed documents have an artifact of the wrong size",
        )
        add(
            "artifact_hash_mismatch",
            ERROR,
            "{n} completed documents have an artifact whose SHA-256 differs",
        )
        add(
            "artifact_unreadable",
            ERROR,
            "{n} completed documents have an artifact that cannot be read",
        )
        add(
            "artifact_unsupported_uri",
            WARNING,
            "{n} completed documents have artifacts this service cannot check",
        )
        add("no_artifacts", WARNING, "{n} completed documents reported no artifact at all")
        add("run_without_artifact", ERROR, "{n} documents have a succeeded run with no artifact")
        add(
            "run_cost_mismatch",
            ERROR,
            "{n} documents have a run whose cost differs from what the ledger charged it",
        )
        add(
            "missing_cost_events",
            ERROR,
            "{n} documents have a succeeded stage with no cost event in the ledger",
        )
        add(
            "missing_cost_cache_hit",
            WARNING,
            "{n} documents have a cache-hit stage with no (zero-cost) event",
        )
        if drift:
            text = ", ".join(f"{k}: stored {a}, recounted {b}" for k, (a, b) in drift.items())
            findings.append(
                Finding(
                    ERROR,
                    "counter_drift",
                    f"session counters drifted ({text})",
                    sum(abs(a - b) for a, b in drift.values()),
                )
            )
        add(
            "retryable_failure",
            WARNING,
            "{n} documents failed with retryable errors after every attempt",
        )
        add(
            "permanent_failure",
            WARNING,
            "{n} documents failed permanently although the scan found no problem",
        )
        add("cancelled", WARNING, "{n} documents were cancelled")
        add("in_progress", WARNING, "{n} documents are still pending, queued or running")
        if input_problems:
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(input_problems.items()))
            add(
                "input_problem",
                INFO,
                "{n} files the scan found broken failed permanently with the scan's reason ("
                + kinds
                + ")",
            )
        add("duplicates", INFO, "{n} duplicate files were skipped")
        add("excluded", INFO, "{n} files were excluded by the manifest")
        add("attachments", INFO, "{n} e-mail attachments were processed with their e-mail")
        if failure_patterns:
            top = ", ".join(
                f"{code or cls or 'error'} ({mime or 'unknown type'}): {n}"
                for (cls, code, mime), n in failure_patterns.most_common(5)
            )
            findings.append(
                Finding(
                    INFO,
                    "failure_patterns",
                    f"failures by error and type: {top}",
                    sum(failure_patterns.values()),
                )
            )

        # -- verdict
        completed, skipped, failed = counts[st.COMPLETED], counts[st.SKIPPED], counts[st.FAILED]
        expected_failures = buckets["input_problem"].count if "input_problem" in buckets else 0
        processable = manifest_total - skipped - expected_failures
        rate = 100.0 * completed / processable if processable > 0 else 100.0
        completeness = 100.0 * (completed + skipped) / manifest_total if manifest_total else 100.0
        findings.append(
            Finding(
                INFO,
                "processable_completion",
                f"{completed} of {processable} processable files completed ({rate:.1f}%)",
                completed,
            )
        )
        errors = any(f.severity == ERROR for f in findings)
        warnings = any(f.severity == WARNING for f in findings)
        if errors or rate < WARN_AT:
            verdict = FAIL
        elif warnings or rate < PASS_AT:
            verdict = WARN
        else:
            verdict = PASS

        # -- recommendations
        codes = {f.code for f in findings}
        if "in_progress" in codes and session.state not in st.SESSION_TERMINAL:
            recommendations.append(
                f"The session is {session.state}; verify again when it has finished "
                f"(docimport watch {session_id})."
            )
        if "retryable_failure" in codes:
            recommendations.append(
                f"Retry the retryable failures: docimport retry {session_id} --failed"
            )
        if "permanent_failure" in codes:
            recommendations.append(
                "Inspect the permanent failures (docimport documents "
                f"{session_id} --state failed); fix the files and retry with --force."
            )
        if codes & {
            "artifact_missing",
            "artifact_size_mismatch",
            "artifact_hash_mismatch",
            "missing_stage_run",
        }:
            recommendations.append(
                "Re-process the affected documents: docimport retry "
                f"{session_id} --document ID --force"
            )
        if "missing_cost_events" in codes:
            recommendations.append(
                "Check the workers' cost reporting; the affected runs were not charged."
            )
        if "counter_drift" in codes:
            recommendations.append(
                "Counter drift is a bug in the session service; report it with this output."
            )
        if not deep and artifacts:
            recommendations.append("Run with --deep to re-hash every artifact.")
        severity_rank = {ERROR: 0, WARNING: 1, INFO: 2}
        findings.sort(key=lambda f: severity_rank[f.severity])
        return VerifyReport(
            session_id=session_id,
            verdict=verdict,
            manifest_files=manifest_total,
            completed=completed,
            skipped=skipped,
            failed=failed,
            unaccounted=unaccounted,
            in_progress=counts[st.PENDING] + counts[st.QUEUED] + counts[st.RUNNING],
            findings=tuple(findings),
            recommendations=tuple(dict.fromkeys(recommendations)),
            completeness_percent=round(completeness, 2),
            actual_cost=actual_cost,
            estimated_cost=session.estimated_cost,
        )

    async def _check_money(
        self,
        session: SessionInfo,
        succeeded_runs: list[tuple[str, str, int, bool]],
        run_costs: dict[tuple[str, str, int], Decimal],
        buckets: dict[str, _Bucket],
        findings: list[Finding],
        recommendations: list[str],
    ) -> Decimal | None:
        """The ledger against the runs, the session and the budget; returns the ledger's total."""
        if self._cost is None:
            findings.append(Finding(WARNING, "costs_unverified", "no cost service configured"))
            return None
        try:
            ledger = await self._cost.actual_events(session.session_id)
            budget = await self._cost.get_budget(session.session_id)
        except PeerFailure as exc:
            findings.append(
                Finding(
                    WARNING,
                    "costs_unverified",
                    f"the cost ledger could not be read: {describe(exc)}",
                )
            )
            recommendations.append("Run verify again when the cost service is reachable.")
            return None
        for document_id, stage, attempt, cache_hit in succeeded_runs:
            if ledger.runs.get((document_id, stage, attempt), 0) == 0:
                buckets["missing_cost_cache_hit" if cache_hit else "missing_cost_events"].add(
                    document_id
                )
        for key in run_costs.keys() | ledger.amounts.keys():
            if run_costs.get(key, Decimal(0)) != ledger.amounts.get(key, Decimal(0)):
                buckets["run_cost_mismatch"].add(key[0])
        totals = [("the ledger", ledger.total), ("the session's cost", session.reported_cost)]
        if budget is not None:
            totals.append(("the budget's spent amount", budget.spent))
        if len({amount for _, amount in totals}) > 1:
            text = ", ".join(f"{name} ${amount}" for name, amount in totals)
            findings.append(Finding(ERROR, "cost_mismatch", f"the money disagrees: {text}"))
            recommendations.append(
                "Verify again once every worker has delivered its finished runs; if the figures "
                "still differ, report it with this output."
            )
        if session.wasted_cost:
            findings.append(
                Finding(
                    INFO,
                    "wasted_cost",
                    f"${session.wasted_cost} of it was spent on attempts that were lost or "
                    "cancelled",
                )
            )
        return ledger.total

    async def _check_artifacts(
        self, artifacts: list[tuple[str, dict]], deep: bool
    ) -> list[tuple[str, artifact_store.ArtifactCheck]]:
        """Failed checks as (document id, check); runs the blocking checks in threads."""
        semaphore = asyncio.Semaphore(self._concurrency)
        failures: list[tuple[str, artifact_store.ArtifactCheck]] = []

        async def one(document_id: str, artifact: dict) -> None:
            async with semaphore:
                check = await asyncio.to_thread(
                    artifact_store.verify_artifact,
                    artifact.get("uri", ""),
                    artifact.get("sha256", ""),
                    artifact.get("size_bytes") or None,
                    deep=deep,
                )
            if not check.ok:
                failures.append((document_id, check))

        for start in range(0, len(artifacts), 1000):
            await asyncio.gather(*(one(d, a) for d, a in artifacts[start : start + 1000]))
        return failures
