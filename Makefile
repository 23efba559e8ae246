# Tandem: `make demo` and `make test` work on a fresh clone; each sets up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tandem-installed
# Collectives and transports stay on loopback on a developer machine and in CI.
export GLOO_SOCKET_IFNAME ?= lo
export UCX_NET_DEVICES ?= lo
export RAY_DEDUP_LOGS ?= 0
PROTOS := $(wildcard proto/tandem/v1/*.proto)

.PHONY: setup demo test test-fast bench proto lint clean

setup: $(STAMP)

# torch goes in first, pinned: on this machine 2.13.0 is the CPU build on disk, and nixl depends on
# an unpinned torch that a resolver would otherwise fetch as a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m orchestrator.demo deploy/local.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=20 tests

# Everything but the slow and end-to-end tests: the inner loop while developing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not e2e" tests

# -P: bench/kernels.py must not shadow the kernels package.
bench: $(STAMP)
	mkdir -p out/bench
	@set -e; for b in bench/*.py; do \
	  n=$$(basename $$b .py); echo "== $$n"; $(PY) -P $$b --json out/bench/$$n.json; done

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTOS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) ../shared/checks/architecture.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
