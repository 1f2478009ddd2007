"""deploy/grafana and deploy/prometheus: well-formed, and only metrics the code exports.

The names every service and the worker can export are read from their
registries (built here, nothing scraped); each `docimport_*` name in a
dashboard query or an alert expression must be one of them. When promtool
is available (on PATH or `DOCIMPORT_TEST_PROMTOOL`), the rules are also
checked and their unit tests (`alerts_test.yml`) run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from services.common.metrics import ServiceMetrics
from services.cost.metrics import CostMetrics
from services.manifest.metrics import ManifestMetrics
from services.session.metrics import SessionMetrics
from services.worker.config import WorkerSettings
from services.worker.metrics import WorkerMetrics

DASHBOARD = ROOT / "deploy" / "grafana" / "docimport-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
METRIC_NAME = re.compile(r"\bdocimport_[a-z0-9_]+")
# The sample names of each family type, as PromQL sees them.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "unknown": ("",),
}
REQUIRED_ALERTS = {
    "DocimportNoWorkers",
    "DocimportStalledDocuments",
    "DocimportStageErrorRateHigh",
    "DocimportBudgetNearlySpent",
}


async def exported_names() -> set[str]:
    """Every sample name the services' and the worker's registries can expose."""
    session = SessionMetrics()
    session.watch_database(store=None, stall_after=600)
    session.watch_queues(dict)
    cost = CostMetrics()
    cost.watch_budgets(store=None, window=60)
    worker = WorkerMetrics(WorkerSettings(broker_url="redis://unused", pool="solo"))
    names: set[str] = set()
    for metrics in (session, cost, ManifestMetrics(), worker):
        for collector in list(metrics.registry._collector_to_names):  # noqa: SLF001
            describe = getattr(collector, "describe", None)
            for family in describe() if describe is not None else ():
                names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


async def test_every_metric_the_dashboard_and_alerts_use_is_exported():
    exported = await exported_names()
    assert "docimport_rpc_duration_seconds_bucket" in exported
    assert "docimport_documents" in exported and "docimport_queue_messages" in exported
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 15
    assert not used - exported, f"not exported: {sorted(used - exported)}"


async def test_a_name_the_code_does_not_export_is_caught():
    exported = await exported_names()
    assert "docimport_documents_total" not in exported  # a gauge has no _total
    assert "docimport_stage_duration_seconds" not in exported  # only _bucket/_count/_sum


def test_the_dashboard_is_a_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and METRIC_NAME.search(target["expr"]), target


def test_the_alert_rules_are_complete():
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert REQUIRED_ALERTS <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def _promtool() -> str | None:
    configured = os.environ.get("DOCIMPORT_TEST_PROMTOOL")
    if configured:
        return configured
    return shutil.which("promtool")


@pytest.mark.skipif(_promtool() is None, reason="promtool not found (PATH or DOCIMPORT_TEST_PROMTOOL)")
def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    promtool = _promtool()
    assert promtool is not None
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], capture_output=True,
                            text=True, timeout=60, cwd=ALERT_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


async def test_a_failing_collector_is_counted_and_the_scrape_goes_on():
    """A database read that fails leaves its families out and counts the error."""
    import asyncio

    from prometheus_client import generate_latest

    metrics = ServiceMetrics()

    async def broken() -> list:
        raise ConnectionError("database down (test)")

    metrics.add_database_collector("broken", broken, [])
    first = (await asyncio.to_thread(generate_latest, metrics.registry)).decode()
    assert "process_resident_memory_bytes" in first
    # The counter is collected before the collector that failed: it shows from the next scrape.
    text = (await asyncio.to_thread(generate_latest, metrics.registry)).decode()
    assert 'docimport_metrics_collect_errors_total{collector="broken"} 1.0' in text
    assert "process_resident_memory_bytes" in text


def test_paths_exist():
    for path in (DASHBOARD, ALERTS, ALERT_TESTS):
        assert Path(path).is_file()
