# The two commands a new user runs: `make up` and `make test`.
# Everything lands in .venv; nothing is installed system-wide.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# The suite runs in TEST_WORKERS pytest-xdist processes, a whole test file at a time
# in each (--dist loadfile: a module's fixtures start once). Most of its time is spent
# waiting on the real processes it starts, so two overlap well even on two busy
# cores (13:00 -> 9:22 under test-busy, 2026-12-02). Each process starts its own
# Redis, PostgreSQL and workers. TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2

# OPA is on neither PyPI nor Debian: `make opa` builds it from its Go module
# into .tools/bin (gitignored). Its go.mod asks for Go >= 1.26.
OPA_VERSION := 1.22.3
OPA_BIN     := .tools/bin/opa
GO          ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)

.PHONY: up test bench venv dev clean opa lock

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "govgate needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps: reinstall only when pyproject.toml or constraints.txt changes.
# constraints.txt pins the exact versions the suite last passed on (`make lock`
# writes it; .ci/lock.py says why): a fresh machine installs that set, not the
# newest release in each of pyproject.toml's ranges.
# Not --quiet: the first install downloads about 340 MB (the default model is
# 253 MB of it), and pip's lines and progress bars show it is moving.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	@echo "installing govgate and its dependencies into $(VENV) (the first time: about 340 MB, a few minutes)"
	$(BIN)/python -m pip install --progress-bar on -c constraints.txt -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# Move the pins to the newest releases pyproject.toml's ranges allow; then
# `make test` (the changed file reinstalls the venv) and commit both if it passes.
lock: | $(BIN)/python
	$(BIN)/python .ci/lock.py

up: $(VENV)/.installed
	$(BIN)/govgate up

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Every bench in BENCHES that exists in this checkout runs with
# --json bench/results/<name>.json (and --quick with QUICK=1, for the benches
# that take it); one that fails does not stop the others. bench/collect.py then
# merges the files, with the machine they came from, into
# bench/results/latest.json, and make fails if any bench did.
BENCHES     ?= overhead ttft policy audit_append audit startup fairness counter_encodings
BENCH_OUT   := bench/results
QUICK       ?=

bench: $(VENV)/.installed-dev
	@mkdir -p $(BENCH_OUT); failed=""; \
	for name in $(BENCHES); do \
		script=bench/$$name.py; \
		if [ ! -f $$script ]; then echo "== $$script: not in this checkout, skipped"; continue; fi; \
		rm -f $(BENCH_OUT)/$$name.json; \
		quick=""; if [ -n "$(QUICK)" ] && grep -q -- '--quick' $$script; then quick=--quick; fi; \
		echo "== $$script $$quick"; \
		$(BIN)/python $$script --json $(BENCH_OUT)/$$name.json $$quick || failed="$$failed $$name"; \
	done; \
	$(BIN)/python bench/collect.py --results $(BENCH_OUT) $(BENCHES); \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed" >&2; exit 1; fi

# Skips the build when .tools/bin/opa already is this version.
opa:
	@if $(OPA_BIN) version 2>/dev/null | grep -qx 'Version: $(OPA_VERSION)'; then \
		echo "opa $(OPA_VERSION) is in $(OPA_BIN)"; \
	elif ! command -v $(GO) >/dev/null 2>&1; then \
		echo "make opa needs Go >= 1.26 (https://go.dev/dl); none found as $(GO)" >&2; exit 1; \
	else \
		echo "building opa $(OPA_VERSION) into $(OPA_BIN) with $$($(GO) version)"; \
		GOBIN="$(CURDIR)/.tools/bin" CGO_ENABLED=0 GOFLAGS=-buildvcs=false \
			$(GO) install github.com/open-policy-agent/opa@v$(OPA_VERSION) && \
		$(OPA_BIN) version | grep -qx 'Version: $(OPA_VERSION)'; \
	fi

clean:
	rm -rf $(VENV) var .pytest_cache
