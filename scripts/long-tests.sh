#!/usr/bin/env bash
# The long reliability runs kept out of CI: a full fuzz pass (thousands of generated requests) and a soak of
# thousands of mixed requests with an RSS bound.
set -euo pipefail
cd "$(dirname "$0")/.."
export TTC_FUZZ_EXAMPLES=${TTC_FUZZ_EXAMPLES:-800} TTC_SOAK_REQUESTS=${TTC_SOAK_REQUESTS:-5000}
exec bash scripts/test.sh tests/integration/test_fuzz.py tests/integration/test_soak.py "$@"
