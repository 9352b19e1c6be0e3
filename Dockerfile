# syntax=docker/dockerfile:1
#
# star-serve image. The default is a CUDA image with a CUDA build of torch:
#   docker build -t star-serve .
# A CPU image takes the CPU wheel of torch (and, optionally, a plain Ubuntu base of the same release):
#   docker build -t star-serve:cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg BASE_IMAGE=ubuntu:24.04 .
# Where the PyTorch index is out of reach, PIP_FIND_LINKS names wheels to take first (pip's --find-links: a
# URL or a directory), for example a CPU torch served from the host; PIP_CONSTRAINT pins what else is installed
# (a constraints file's URL). `make image-test` builds it that way, with podman, on a Debian base made by
# debootstrap (scripts/image-base).
#
# Both stages start from the same base, so the virtual environment built in the first one runs unchanged
# on the Python interpreter of the second.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- build: a virtual environment with torch and star-serve installed -------------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_REQUIREMENT="torch>=2.4,<3"
ARG PIP_FIND_LINKS=""
ARG PIP_CONSTRAINT=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the PyTorch index, so that `pip install .` finds it satisfied and keeps it.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_REQUIREMENT}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY star_serve ./star_serve
RUN pip install . && python -c "import star_serve, torch; print('torch', torch.__version__)"

# ---- runtime -------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="star-serve" \
      org.opencontainers.image.description="Inference server for STAR Mixture-of-Experts models" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric user, so that Kubernetes' runAsNonRoot can check it. Its home is the data directory.
RUN groupadd --system --gid 10001 star \
    && useradd --system --uid 10001 --gid star --home-dir /var/lib/star-serve --shell /usr/sbin/nologin star \
    && mkdir -p /models /var/lib/star-serve/cache /var/lib/star-serve/state \
    && chown -R star:star /var/lib/star-serve

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/star-serve \
    STAR_HOST=0.0.0.0 \
    STAR_PORT=8000 \
    STAR_CACHE_DIR=/var/lib/star-serve/cache \
    STAR_STATE_DIR=/var/lib/star-serve/state

# /models: checkpoints, mounted read-only. /var/lib/star-serve: the demo models' cache and local state.
VOLUME ["/models", "/var/lib/star-serve"]
WORKDIR /var/lib/star-serve
USER 10001:10001
EXPOSE 8000

# Liveness only (the process and its engine threads); the port is not open until the models are loaded,
# and building the demo models on a first start takes minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('STAR_PORT', '8000') + '/health', timeout=4)"]

# Exec form: star-serve is PID 1 and receives SIGTERM itself, which starts the drain.
ENTRYPOINT ["star-serve"]
CMD ["serve"]
