#!/usr/bin/env bash
# Prepare Multi30k task 1 for fairseq (see docs/DATA.md).
#
#   scripts/prepare-multi30k.sh --out DIR [--raw DIR] [--src de --tgt en] [--vocab-size 8000]
#                               [--workers 2] [--valid val] [--test test_2016_flickr]
#                               [--extra-tests test_2017_flickr,test_2017_mscoco] [--force]
#
# Without --raw the gzipped raw files are downloaded from github.com/multi30k/dataset.
# On the project machine: scripts/prepare-multi30k.sh --out data/multi30k --raw ../shared/data/multi30k
#
# All options: scripts/prepare-multi30k.sh --help. The work is done by
# `python -m fairseq_pskd.prepare multi30k`; this wrapper only picks the Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The active venv, else the repository's .venv, else python3 on PATH.
if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
elif command -v python3 >/dev/null 2>&1; then
  PY="$(command -v python3)"
else
  echo "prepare-multi30k.sh: no Python found; run scripts/install.sh first" >&2
  exit 1
fi

# Importable from a plain checkout too (no pip install -e needed). Relative paths in the
# arguments stay relative to the caller's directory: no cd.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m fairseq_pskd.prepare multi30k "$@"
