#!/usr/bin/env bash
# Set up (idempotent), lint (ruff check) and run the test suite. Extra arguments go to pytest.
#   bash scripts/test.sh              # everything but the long runs (marker "slow")
#   bash scripts/test.sh -m "not e2e" # the fast tier: in process, no subprocess (still not slow)
#   bash scripts/test.sh -m e2e       # the end-to-end tier: fairseq-train & co. (still not slow)
#   bash scripts/test.sh -m slow      # the long runs only
# A -m expression that does not name "slow" is combined with "not slow".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
source "$ROOT/scripts/_python.sh"
# Lint first (ruff.toml), with a pinned ruff so that its verdict does not change under us; a
# developer's tool, so the test command installs it, not install.sh.
RUFF_VERSION=0.17.6
if [[ "$("$PY" -m ruff --version 2>/dev/null)" != "ruff $RUFF_VERSION" ]]; then
  "$PY" -m pip install --disable-pip-version-check -q "ruff==$RUFF_VERSION"
fi
"$PY" -m ruff check --quiet . || { echo "[test] ruff check failed (see above; ruff.toml)" >&2; exit 1; }
# OMP_NUM_THREADS=1: the suite runs many small fairseq subprocesses; one thread each avoids
# oversubscribing small machines. pytest exits non-zero on any failure and with 5 when no
# test was collected, so an empty run never passes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
marker="not slow"
args=()
while (($#)); do
  if [[ "$1" == "-m" && $# -ge 2 ]]; then
    if [[ "$2" == *slow* ]]; then marker="$2"; else marker="not slow and ($2)"; fi
    shift 2
  else
    args+=("$1")
    shift
  fi
done
exec "$PY" -m pytest -m "$marker" ${args[@]+"${args[@]}"}
