# Developer entry points. Everything the targets need is installed by them
# (Python venv, PostgreSQL from Debian, Kafka jars from Maven Central), so they
# work on a fresh machine. Runtime state lives in .run/ (see deploy/*.sh).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
ENV_FILE    := .run/env
PYTEST_ARGS ?=
BENCH_ARGS  ?=

# Load .run/env (written by deploy/pg.sh and deploy/kafka.sh) into a recipe.
LOAD_ENV := set -a && source $(ENV_FILE) && set +a

.PHONY: help venv infra up down test bench

help:
	@echo "make venv   - create .venv and install the project (.[dev])"
	@echo "make infra  - start PostgreSQL and Kafka (deploy/pg.sh, deploy/kafka.sh)"
	@echo "make up     - infra + services + demo seed"
	@echo "make down   - stop services, Kafka and PostgreSQL"
	@echo "make test   - infra + pytest (PYTEST_ARGS=... passed through)"
	@echo "make bench  - infra + load benchmark (python -m load.bench; BENCH_ARGS=--quick for a smoke run)"

venv: $(STAMP)

# pip runs again only when a pyproject.toml is newer than the stamp. The client package (clients/python) is installed
# beside the project, editable: `cvl`'s provider, issuer and monitor commands are built on it, and the tests use it.
# (Not a dev extra: pip takes no relative path in a dependency.)
$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]' -e ./clients/python
	@touch $@

infra:
	bash deploy/pg.sh start
	bash deploy/kafka.sh start

up: venv infra
	bash deploy/services.sh start
	$(LOAD_ENV) && $(VENV)/bin/cvl demo seed
	@echo
	@echo "issuing     http://127.0.0.1:$${CVL_ISSUING_PORT:-8081}"
	@echo "redemption  http://127.0.0.1:$${CVL_REDEMPTION_PORT:-8082}"
	@echo "ledger      http://127.0.0.1:$${CVL_LEDGER_PORT:-8083}"

down:
	bash deploy/services.sh stop
	bash deploy/kafka.sh stop
	bash deploy/pg.sh stop

test: venv infra
	$(LOAD_ENV) && $(VENV)/bin/pytest -q tests $(PYTEST_ARGS)

# wrk (Debian) drives the single-mint phase: a C load generator leaves the services most of the two cores.
# pgbench (with Debian's postgresql, /usr/lib/postgresql/<ver>/bin) runs the naive baseline first.
# BENCH_ARGS=--quick: every phase shortened, a smoke run of about a minute (its figures are not results).
bench: venv infra
	@command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null || \
		echo "wrk not installed: the single-mint phase uses the Python client only"
	$(LOAD_ENV) && $(PY) -m load.bench $(BENCH_ARGS)
