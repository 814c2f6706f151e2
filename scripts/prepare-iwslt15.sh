#!/usr/bin/env bash
# Prepare IWSLT 2015 TED English-German for fairseq (see docs/DATA.md).
#
#   scripts/prepare-iwslt15.sh --out DIR [--raw 2015-01.tgz|en-de.tgz|de-en.tgz|DIR]
#                              [--src en --tgt de] [--vocab-size 10000] [--workers 2]
#                              [--dev tst2012] [--test tst2013] [--extra-tests tst2014,...]
#                              [--sha256 HEX] [--url URL] [--force]
#
# Without --raw the release is downloaded (no checksum is published: the sha256 of what was
# downloaded is printed and recorded in OUT/prepare.json; --sha256 enforces one).
#
# All options: scripts/prepare-iwslt15.sh --help. The work is done by
# `python -m fairseq_pskd.prepare iwslt15`; this wrapper only picks the Python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

source "$ROOT/scripts/_python.sh"

# Importable from a plain checkout too (no pip install -e needed). Relative paths in the
# arguments stay relative to the caller's directory: no cd.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m fairseq_pskd.prepare iwslt15 "$@"
