#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest.
#   bash scripts/test.sh              # everything but the long runs (marker "slow")
#   bash scripts/test.sh -m slow      # the long runs only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
source "$ROOT/scripts/_python.sh"
# OMP_NUM_THREADS=1: the suite runs many small fairseq subprocesses; one thread each avoids
# oversubscribing small machines. pytest exits non-zero on any failure and with 5 when no
# test was collected, so an empty run never passes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ " $* " == *" -m "* ]]; then
  exec "$PY" -m pytest "$@"
fi
exec "$PY" -m pytest -m "not slow" "$@"
