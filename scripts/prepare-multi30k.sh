#!/usr/bin/env bash
# Prepare Multi30k task 1 for fairseq (see docs/DATA.md).
#
#   scripts/prepare-multi30k.sh --out DIR [--raw DIR] [--src de --tgt en] [--vocab-size 8000]
#                               [--workers 2] [--valid val] [--test test_2016_flickr]
#                               [--extra-tests test_2017_flickr,test_2017_mscoco] [--force]
#
# Without --raw the gzipped raw files are downloaded from github.com/multi30k/dataset.
# With a local copy of data/task1/raw: scripts/prepare-multi30k.sh --out data/multi30k --raw /path/to/raw
#
# All options: scripts/prepare-multi30k.sh --help. The work is done by
# `python -m fairseq_pskd.prepare multi30k`; this wrapper only picks the Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

source "$ROOT/scripts/_python.sh"

# Importable from a plain checkout too (no pip install -e needed). Relative paths in the
# arguments stay relative to the caller's directory: no cd.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m fairseq_pskd.prepare multi30k "$@"
