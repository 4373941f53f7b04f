# yan-serve: the YAN HTTP server in a container (docs/deploy.md).
# Needs BuildKit (RUN --mount); no `# syntax=` line on purpose: the builder's own Dockerfile
# frontend does all this file uses, and a syntax image would have to come from a registry.
#
#   docker build -t yan-serve:cuda .                          # CUDA runtime + CUDA torch (default)
#   docker build -t yan-serve:cpu --build-arg VARIANT=cpu .   # Python slim + CPU torch
#   docker run --gpus all -p 8000:8000 yan-serve:cuda
#   docker run -p 8000:8000 -v /ckpt/mine:/models/mine:ro yan-serve:cpu \
#       --host 0.0.0.0 --port 8000 --model /models/mine
#
# Both variants install through scripts/install.sh, the install path CI runs, and start the
# same `yan-serve` console script. The shipped checkpoint (weights/yan-small-kjv) is baked in and
# is the default --model; mount a volume and pass --model (or YAN_SERVE_MODEL) to serve another.

ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG CPU_IMAGE=python:3.12-slim-bookworm
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu

# ---- CUDA runtime base: Ubuntu's Python 3.12 in a venv; torch's CUDA wheels bring Triton.
FROM ${CUDA_IMAGE} AS base-cuda
ARG CUDA_TORCH_INDEX
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=${CUDA_TORCH_INDEX}

# ---- CPU base: the official Python image and torch's CPU wheels.
FROM ${CPU_IMAGE} AS base-cpu
ARG CPU_TORCH_INDEX
ENV TORCH_INDEX_URL=${CPU_TORCH_INDEX}

# ---- the server, on whichever base VARIANT names (hadolint cannot resolve a stage name built
# from an ARG, hence the inline ignore; both candidates above are pinned)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS server
ARG TORCH_VERSION=2.13.0
# Extras of pyproject.toml to install besides the package; empty: the package alone (the
# script's own default, for CI, is `dev`).
ARG EXTRAS=""
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    YAN_SERVE_HOST=0.0.0.0
RUN python3 -m venv /opt/venv \
    && groupadd --gid 10001 yan \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin yan

WORKDIR /app
# What scripts/install.sh needs: the project metadata and package layout (setup.py maps kernels/
# to yan_kernels), the packages (installed editable, so the default --model resolves to
# /app/weights/yan-small-kjv) and the script itself.
COPY pyproject.toml setup.py README.md ./
COPY scripts/install.sh scripts/install.sh
COPY yan_serve/ yan_serve/
COPY kernels/ kernels/
# The pip cache mount keeps the torch wheel across rebuilds without putting it in a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    EXTRAS="${EXTRAS}" TORCH_VERSION="${TORCH_VERSION}" bash scripts/install.sh
COPY weights/ weights/

# numeric, so Kubernetes' runAsNonRoot can verify it (deploy/k8s runs as the same uid)
USER 10001:10001
EXPOSE 8000
# Liveness only (the process answers HTTP); /ready tells when the model is loaded. Python is in
# both bases, curl is not. Change the port here too if you change --port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Exec form: yan-serve is PID 1 and gets SIGTERM itself (drain, then exit 0).
ENTRYPOINT ["yan-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
