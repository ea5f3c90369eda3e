#!/usr/bin/env bash
# The attack suite of docs/reliability.md: fuzz, load, fault and limit tiers against real servers on 127.0.0.1.
#   scripts/reliability.sh          reduced size, as CI runs it inside the full test run (a few minutes)
#   scripts/reliability.sh --full   full size: 32 WebSocket sessions for 120 s, 5000 fuzz examples per target
# Run scripts/setup.sh first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--full" ]; then
  shift
  export LOAD_SESSIONS="${LOAD_SESSIONS:-32}" LOAD_SECONDS="${LOAD_SECONDS:-120}" FUZZ_EXAMPLES="${FUZZ_EXAMPLES:-5000}"
fi
exec .venv/bin/python -m pytest -q -s -p no:cacheprovider -m reliability "$@"
