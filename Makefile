# docimport: two commands for a fresh machine (Python 3.11+ and make):
#   make demo   - local stack, sample case analyzed, imported, verified, costed
#   make test   - the whole test suite (starts its own Postgres and Redis)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BUF_VERSION := 1.75.0

.PHONY: install demo test test-fast check-protos protos bench lock clean

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

protos: install
	$(BIN)/python scripts/gen_protos.py

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# Refresh the pinned versions from the current virtual environment.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) var build *.egg-info
