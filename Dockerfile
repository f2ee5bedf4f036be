# syntax=docker/dockerfile:1
# ttc-gateway: the stateless gateway image (no inference engine, no model weights).
# Workers run elsewhere (compose `policy`/`reward` services, or a cluster engine) and are reached through
# TTC_POLICY__URLS / TTC_REWARD__URLS. Build:  docker build -t ttc-gateway:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build stage: resolve and install the package into a self-contained virtualenv -------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Metadata first so the dependency layer is reused when only the code changes.
COPY pyproject.toml README.md* ./
COPY service ./service
# Base install only: no engine extra ('.[cpu]' / '.[gpu]'), the engines live in the worker images.
RUN pip install --upgrade pip \
 && pip install .

# ---- runtime stage ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ttc-gateway" \
      org.opencontainers.image.description="OpenAI-compatible test-time-compute gateway over vLLM workers" \
      org.opencontainers.image.licenses="Apache-2.0"
# Fixed numeric UID/GID so Kubernetes runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 ttc \
 && useradd --system --uid 10001 --gid ttc --home-dir /home/ttc --create-home --shell /usr/sbin/nologin ttc
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TTC_HOST=0.0.0.0 \
    TTC_PORT=8000
WORKDIR /home/ttc
USER 10001:10001
EXPOSE 8000
# python:slim has no curl: probe liveness with the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TTC_PORT', '8000'), timeout=2)"]
# SIGTERM starts the gateway's drain (/ready turns 503, in-flight requests finish).
STOPSIGNAL SIGTERM
CMD ["ttc-gateway", "serve"]
