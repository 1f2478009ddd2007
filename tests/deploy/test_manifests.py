"""What a reviewer checks on every rendered Deployment, in every overlay.

Every container of every Deployment has liveness and readiness probes (native
gRPC on the standard health service for the services, the worker's HTTP
probe for workers), CPU and memory requests and limits, and a locked-down
securityContext. Plus the properties the platform team relies on: workers'
grace outlasts their longest task, one KEDA ScaledObject per worker queue,
the session service never below two replicas in prod, the migration only in
its Job.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from services.common.tasks import QUEUES
from services.session.config import SessionSettings
from services.session.dispatcher import timing_for
from services.worker.config import WorkerSettings

from .conftest import OVERLAYS

SERVICES = {"manifest": 50061, "session": 50062, "cost": 50063}


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _quantity(value: str | int) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_resources_and_a_locked_down_security_context(render, overlay):
    rendered = render(overlay)
    deployments = rendered.of_kind("Deployment")
    assert len(deployments) >= 7, [d["metadata"]["name"] for d in deployments]
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, deployment["metadata"]["name"]
        for container in _containers(deployment):
            where = f"{overlay}: {deployment['metadata']['name']}/{container['name']}"
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in container, f"{where}: no {probe}"
                handler = {"grpc", "httpGet", "exec", "tcpSocket"} & set(container[probe])
                assert handler, f"{where}: {probe} has no handler"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), f"{where}: no {kind}.{resource}"
                assert _quantity(resources["requests"][resource]) <= _quantity(resources["limits"][resource])
            security = container.get("securityContext", {})
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in security.get("capabilities", {}).get("drop", []), where
            assert not security.get("capabilities", {}).get("add"), where
            assert security.get("privileged") is not True, where
            uid = security.get("runAsUser", pod_security.get("runAsUser"))
            assert uid is not None and uid > 0, f"{where}: no non-root runAsUser"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_probe_the_grpc_health_service_on_their_port(render, overlay):
    rendered = render(overlay)
    for name, port in SERVICES.items():
        deployment = rendered.get("Deployment", f"docimport-{name}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["command"] == [f"docimport-{name}"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["DOCIMPORT_PORT"] == str(port)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{name} {probe}"
            assert container[probe]["grpc"].get("service", "") == ""
        service = rendered.get("Service", f"docimport-{name}")
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        assert ports == {"grpc": port, "metrics": 9090}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_per_queue_outlast_their_longest_task(render, overlay):
    rendered = render(overlay)
    config = rendered.get("ConfigMap", _config_map_name(rendered))["data"]
    settings = {k.removeprefix("DOCIMPORT_").lower(): v for k, v in config.items()
                if k.startswith("DOCIMPORT_")}
    session = SessionSettings(database_url="postgresql://x", broker_url="redis://x", **{
        k: v for k, v in settings.items() if k in SessionSettings.model_fields})
    max_file = int(config["DOCIMPORT_MAX_FILE_BYTES"])
    longest_message = timing_for(session, max_file).time_limit
    seen_queues = set()
    for queue in QUEUES.values():
        deployment = rendered.get("Deployment", f"docimport-worker-{queue}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["docimport-worker"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        worker = WorkerSettings(broker_url="redis://x", **{
            k: v for k, v in settings.items() if k in WorkerSettings.model_fields},
            queues=env["DOCIMPORT_QUEUES"])
        assert worker.queues == (queue,)
        seen_queues.add(queue)
        longest = max(longest_message, worker.default_time_limit)
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > math.ceil(longest), f"{queue}: grace {grace}s <= longest task {longest}s"
        assert worker.visibility_timeout > longest
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert seen_queues == set(QUEUES.values())
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in rendered.of_kind("ScaledObject")}
    if overlay == "dev":
        assert not scaled  # the trial needs no KEDA
        return
    for queue in QUEUES.values():
        (trigger,) = scaled[f"docimport-worker-{queue}"]["spec"]["triggers"]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_ports_listen_on_the_pod_address_behind_the_network_policy(render, overlay):
    """/metrics stays on loopback by default; in a pod it must face Prometheus."""
    rendered = render(overlay)
    scraped = set()
    for deployment in rendered.of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if not any(p.get("name") == "metrics" for p in container.get("ports", [])):
                continue
            if not container["command"][0].startswith("docimport-"):
                continue  # Flower serves its own /metrics on its web port
            env = {}
            for source in container.get("envFrom", []):
                env.update(rendered.config_map(source["configMapRef"]["name"]))
            env.update({e["name"]: e.get("value") for e in container.get("env", [])})
            where = f"{overlay}: {deployment['metadata']['name']}"
            assert env.get("DOCIMPORT_METRICS_HOST") == "0.0.0.0", where
            assert env.get("DOCIMPORT_METRICS_PORT") == "9090", where
            scraped.add(deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])
    assert scraped == {"manifest", "session", "cost", "worker"}
    (policy,) = [p for p in rendered.of_kind("NetworkPolicy")
                 if p["metadata"]["name"] == "docimport-metrics-ingress"]
    assert set(policy["spec"]["podSelector"]["matchExpressions"][0]["values"]) >= scraped
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [9090]


def _config_map_name(rendered) -> str:
    (cm,) = [c for c in rendered.of_kind("ConfigMap") if c["metadata"]["name"].startswith("docimport-config")]
    return cm["metadata"]["name"]


def test_prod_session_never_runs_fewer_than_two_replicas(render):
    rendered = render("prod")
    assert rendered.get("HorizontalPodAutoscaler", "docimport-session")["spec"]["minReplicas"] >= 2
    pdb = rendered.get("PodDisruptionBudget", "docimport-session")
    assert pdb["spec"]["minAvailable"] >= 1
    for name in SERVICES:
        assert "replicas" not in rendered.get("Deployment", f"docimport-{name}")["spec"], \
            "an HPA-managed Deployment must not set replicas (a re-apply would fight the HPA)"


def test_dev_runs_single_replicas_with_in_cluster_datastores(render):
    rendered = render("dev")
    for deployment in rendered.of_kind("Deployment"):
        assert deployment["spec"].get("replicas") == 1, deployment["metadata"]["name"]
    assert rendered.get("StatefulSet", "postgres") and rendered.get("Deployment", "redis")
    assert not rendered.of_kind("HorizontalPodAutoscaler")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_runs_only_in_its_job(render, overlay):
    rendered = render(overlay)
    job = rendered.get("Job", "docimport-migrate")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["docimport-migrate"]
    assert "argocd.argoproj.io/sync-wave" in job["metadata"]["annotations"]
    for deployment in rendered.of_kind("Deployment"):
        for container in _containers(deployment):
            assert "migrate" not in " ".join(container.get("command", []) + container.get("args", []))
