# The commands people type. `make run` and `make test` install what they need first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SERVE_ENV   := .venv-serve
SERVE_STAMP := $(SERVE_ENV)/.installed
# torch==2.13.0 resolves to the CPU wheel kept in /opt/wheels on these machines.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PROFILE  ?= tiny
RUN_FROM ?= 2026-11-01
RUN_TO   ?= 2026-11-03
PYTEST_ARGS ?=

.PHONY: help install test lint run status stop clean bench browser fuzz

help:
	@echo "make run      install, start Airflow + MLflow + Triton + gateway on 127.0.0.1, run the lifecycle on the $(PROFILE) profile, print URLs"
	@echo "make status   what is up, the last DAG runs, champion and challenger, the last drift decision, the reports"
	@echo "make test     install, then make lint (ruff, import-linter, mypy) + pytest (unit, integration, e2e)"
	@echo "make stop     stop the stack;   make clean  stop and remove generated state"
	@echo "make bench    print the benchmark JSON lines"
	@echo "make fuzz     ~2,250 schema-generated requests against a real gateway + model server (no 5xx, OpenAI error bodies)"

install: $(STAMP) $(SERVE_STAMP)

$(STAMP): requirements/lock.txt setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	@echo "==> [1/4] creating $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> [2/4] installing the pinned set from requirements/lock.txt (about 3 minutes on a fresh machine)"
	@set -o pipefail; $(BIN)/pip install -q --disable-pip-version-check $(FIND_LINKS) -r requirements/lock.txt 2>&1 \
	    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@echo "==> [3/4] installing this project (editable)"
	@$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

$(SERVE_STAMP): requirements/serve.txt $(STAMP)
	@echo "==> [4/4] model server: tritonserver (nvidia-pytriton, --no-deps) and its numpy<2 environment $(SERVE_ENV)"
	@set -o pipefail; $(BIN)/pip install -q --disable-pip-version-check --no-deps $(FIND_LINKS) \
	    $$(grep -E '^nvidia-pytriton==' requirements/serve.txt) 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@test -x $(SERVE_ENV)/bin/python || $(PYTHON) -m venv $(SERVE_ENV)
	@set -o pipefail; $(SERVE_ENV)/bin/pip install -q --disable-pip-version-check $$(grep -E '^numpy==' requirements/serve.txt) \
	    2>&1 | { grep -v "is ignored: it is neither" || true; }
	@$(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
	    > $$($(SERVE_ENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_llmops_main.pth
	@$(SERVE_ENV)/bin/python -c 'import numpy, torch, tokenizers, safetensors; assert numpy.__version__ < "2", numpy.__version__'
	@touch $(SERVE_STAMP)

# ruff (style, Airflow's AIR rules, line length), import-linter (the layers of tasks/: pyproject.toml's
# [tool.importlinter] contracts) and mypy (the base modules, model/ and data/)
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# The browser test drives Debian's chromium through Playwright (Playwright's own browser download needs
# the internet): installed here when missing and this user may.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "==> installing Debian's chromium for the browser test (apt-get, ~30 s)"; \
	    { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	      apt-get install -y -q chromium >/dev/null 2>&1; }; } || echo "warning: apt-get install chromium failed"; \
	  else echo "warning: chromium not found: apt-get install chromium, or LLMOPS_SKIP_BROWSER=1 to skip the browser test"; fi; }

test: install lint browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

fuzz: install
	LLMOPS_FUZZ_SCALE=5 $(BIN)/python -m pytest -q -s tests/integration/test_serving.py -k fuzzing

run: install
	@echo "==> the lifecycle on the $(PROFILE) profile, through Airflow's REST API (first run about 8 minutes on 2 cores; again: only checks, seconds)"
	@$(BIN)/llmops lifecycle --profile $(PROFILE) --from $(RUN_FROM) --to $(RUN_TO)

status:
	@$(BIN)/llmops status --profile $(PROFILE)

stop:
	@if [ -x $(BIN)/llmops ]; then $(BIN)/llmops serve down >/dev/null; $(BIN)/llmops stack down >/dev/null && echo "stack stopped"; fi

clean: stop
	rm -rf var reports data/raw data/clean data/quarantine data/shards data/snapshots data/tokenizers \
	       data/.dvc data/.dvcignore data/.gitignore data/clean.dvc data/.data.lock data/requests \
	       models/triton models/checkpoints models/exports dvcstore

bench: install
	$(BIN)/python bench/data.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/tiers.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/monitor.py
	$(BIN)/python bench/memory.py
