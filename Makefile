# relayfed — build, test, lint and generate. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
PYTHON ?= python3
PY_REQS := tests/python/requirements.txt

.PHONY: help build test test-rust test-python python-deps lint fmt crds clean

help: ## List targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## Build every crate and binary.
	$(CARGO) build --workspace --all-targets

test: test-rust test-python ## Run every test suite (Rust and Python).

test-rust: ## Rust unit, property and integration tests.
	$(CARGO) test --workspace

test-python: python-deps ## Offline CRD/chart checks with independent validators.
	$(PYTHON) -m pytest -q tests/python

python-deps: ## Install the Python test dependencies if any is missing.
	@$(PYTHON) -c 'import pytest, yaml, jsonschema, kubernetes_validate' 2>/dev/null \
	  || $(PYTHON) -m pip install -q --disable-pip-version-check -r $(PY_REQS)

lint: ## rustfmt and clippy (warnings are errors).
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code.
	$(CARGO) fmt --all

crds: ## Regenerate charts/relayfed/crds from the Rust types.
	$(CARGO) run -q -p relayfed-crds --bin crdgen -- charts/relayfed/crds

clean: ## Remove build output.
	$(CARGO) clean
