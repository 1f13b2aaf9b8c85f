# kubetune: the two commands users need are `make test` and `make demo`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# Fragments under hack/ add their own targets and append prerequisites to
# TEST_PREREQS (e.g. building the local cluster's binaries).
TEST_PREREQS :=
PYTEST_ARGS ?=
# One xdist worker per core: most suites wait on a cluster or a subprocess, so they overlap, but
# training steps and torch imports are CPU-bound and more workers than cores only slow each test
# (measured on 2 cores: 3 workers 10 min 58 s, 2 workers 9 min 12 s).
# `make test TEST_WORKERS=0` runs in one process (what pytest -n 0 means).
# At most 4: each worker starts its own local cluster on first use.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 4 ? 4 : n )))

-include hack/*.mk

.PHONY: help venv lint crds test demo clean

help:
	@echo "make test   - set up everything from a fresh clone and run lint + the test suite"
	@echo "make demo   - train then serve on the embedded local cluster, from the images (DEMO_ARGS=--keep keeps it)"
	@echo "make images - build the operator and worker images (docker or podman)"
	@echo "make crds   - regenerate crds/ (and docs/api.md) from the API models"
	@echo "make lint   - ruff + mypy"

venv:
	@bash hack/venv.sh

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	@# mypy's cache lives beside the venv it describes, so a fresh clone does not re-analyse torch and
	@# transformers (minutes on two cores); it is keyed on the venv, so new pins start a new one.
	MYPY_CACHE_DIR="$(KUBETUNE_CACHE_DIR)/mypy-$$(basename "$$(readlink -f $(VENV))")" $(PY) -m mypy

crds: venv
	$(PY) -m kubetune crds
	$(PY) -m kubetune.api.apidoc

# Passive OpenMP waits: torch threads that spin on a shared 2-core machine cost ~5x the CPU (the
# worker sets the same default for its own pods, see kubetune/worker/__init__.py).
test: export OMP_WAIT_POLICY ?= PASSIVE
test: venv lint $(TEST_PREREQS)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=30 $(PYTEST_ARGS)

DEMO_ARGS ?=
demo: venv cluster-build images
	$(PY) hack/demo.py $(DEMO_ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
