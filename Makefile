# Rempart: every target is .PHONY and documented; `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SERVICES := smtp-edge imap-pop policy auth admin-api
STAMP := $(VENV)/.installed-stamp
# pytest-xdist workers for `make test` (each test file runs whole in one worker; each worker has
# its own Redis, NATS and suite, and its own share of the free ports). TEST_WORKERS=0: in-process.
TEST_WORKERS ?= 2
PYTEST_ARGS := -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: help pins install proto proto-check lint typecheck test test-unit test-e2e chart images run bench clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.in constraints.txt libs/common/pyproject.toml $(foreach s,$(SERVICES),services/$(s)/pyproject.toml)
	$(PYTHON) tools/check_pins.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing pinned dependencies into $(VENV) (log: $(VENV)/install.log)"
	@{ $(PIP) install --upgrade pip && \
	   $(PIP) install -c constraints.txt -r requirements.in && \
	   $(PIP) install --no-deps -e libs/common $(foreach s,$(SERVICES),-e services/$(s)); \
	 } > $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	touch $(STAMP)

pins: ## Fail if an install file names a local file instead of a package from the index
	$(PYTHON) tools/check_pins.py

install: $(STAMP) ## Create .venv and install every pinned dependency and the services (editable)

proto: install ## Regenerate the Python code of proto/ into libs/common
	$(PY) tools/gen_proto.py

proto-check: install ## Fail if the generated protobuf code is stale
	$(PY) tools/gen_proto.py --check

lint: install ## ruff (lint) and mypy --strict on libs and services
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy libs/common/src $(foreach s,$(SERVICES),services/$(s)/src)

typecheck: lint ## Alias of lint

test-unit: install ## Unit and integration tests (real Redis, NATS, gRPC, DNS on loopback)
	$(PY) -m pytest libs/common/tests $(foreach s,$(SERVICES),services/$(s)/tests) $(PYTEST_ARGS)

test-e2e: install ## The whole suite as processes, driven by real mail clients
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

test: pins proto-check lint chart ## Everything CI runs: pin check, stale-proto check, lint, chart checks, all tests (TEST_WORKERS=2)
	$(PY) -m pytest $(PYTEST_ARGS)

chart: install ## helm lint --strict, helm template over ci/*-values.yaml, schema validation
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tools/chart_check.sh

images: install ## Build the service images from ./Dockerfile, args from the chart's values; IMAGES_ARGS="--tag dev smtp-edge", DOCKER=podman
	$(PY) tools/build_images.py $(IMAGES_ARGS)

run: install ## Start the whole suite locally (Redis, NATS, five services); Ctrl-C stops all; RUN_ARGS="--free-ports --state-dir DIR"
	$(PY) tools/run_local.py $(RUN_ARGS)

bench: install ## Benchmarks vs the reference systems (Postfix, grpc echo, Dovecot); BENCH_ARGS=--quick for a smoke run
	$(PY) tools/bench.py $(BENCH_ARGS)

clean: ## Remove the venv, caches and local run state
	rm -rf $(VENV) .run .tools .pytest_cache .mypy_cache .ruff_cache
