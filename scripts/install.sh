#!/usr/bin/env bash
# Install fairseq-pskd and everything it needs, idempotently.
#
#   bash scripts/install.sh            # uses the active venv, else creates ./.venv
#
# Why it is not a plain `pip install fairseq`: PyPI's fairseq 0.12.2 does not run on
# Python >= 3.11, and every fairseq fork declares torchaudio, which pins one exact torch
# release and would pull a second multi-GB torch. So: torch only if none is installed,
# fairseq with --no-deps plus its real runtime deps, then the plugin (editable).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_VERSION="${PSKD_TORCH_VERSION:-2.13.0}"
# fairseq's runtime deps, minus torchaudio (translation never imports it).
FAIRSEQ_DEPS=("hydra-core>=1.3.2" "omegaconf>=2.3" "numpy" "regex" "tqdm" "bitarray"
              "cffi" "cython" "scikit-learn" "packaging" "sacrebleu>=2.0")
TOOLS=("sacrebleu>=2.0" "sentencepiece" "sacremoses" "matplotlib" "pytest")

log() { echo "[install] $*"; }

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY="$VIRTUAL_ENV/bin/python"
  log "using active virtual environment $VIRTUAL_ENV"
else
  if [[ ! -x .venv/bin/python ]]; then
    log "creating ./.venv"
    python3 -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
  log "using ./.venv (activate it with: source .venv/bin/activate)"
fi
PIP=("$PY" -m pip install --disable-pip-version-check -q)

have() { "$PY" - "$@" <<'PYEOF' 2>/dev/null
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)
PYEOF
}

# 1. torch, only when none is installed (never replace the user's build).
if have torch; then
  log "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed, kept"
else
  log "installing torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi

# 2. fairseq: keep an installed one; else the prebuilt ve-fairseq wheel where it exists
#    (CPython 3.11/3.12 on x86_64), else build fairseq-fixed against the installed torch.
if have fairseq fairseq_cli; then  # found without importing it (an import takes seconds)
  log "fairseq already installed, kept"
else
  read -r PYVER ARCH < <("$PY" -c 'import sys, platform; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine())')
  log "installing fairseq runtime deps"
  "${PIP[@]}" "${FAIRSEQ_DEPS[@]}"
  if [[ "$ARCH" == "x86_64" && ( "$PYVER" == "3.11" || "$PYVER" == "3.12" ) ]]; then
    log "installing ve-fairseq==0.12.3 (prebuilt wheel for CPython $PYVER x86_64)"
    "${PIP[@]}" --no-deps "ve-fairseq==0.12.3"
  else
    log "no prebuilt fairseq for Python $PYVER/$ARCH: building fairseq-fixed==0.12.3.1 (about 3 min)"
    "${PIP[@]}" setuptools wheel
    "${PIP[@]}" --no-deps --no-build-isolation "fairseq-fixed==0.12.3.1"
  fi
fi

# 3. tools and the plugin itself (editable, no deps: they are all named above).
if have sacrebleu sentencepiece sacremoses matplotlib pytest; then
  log "sacrebleu, sentencepiece, sacremoses, matplotlib, pytest already installed"
else
  log "installing ${TOOLS[*]}"
  "${PIP[@]}" "${TOOLS[@]}"
fi
if "$PY" -c 'import importlib.metadata as m; m.distribution("fairseq-pskd")' 2>/dev/null; then
  log "fairseq-pskd already installed"
else
  log "installing fairseq-pskd (editable)"
  "${PIP[@]}" setuptools wheel && "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
fi

# One import of everything: a broken or incompatible install fails here, not in training.
"$PY" -c 'import torch, fairseq, fairseq_pskd; print(f"[install] ok: torch {torch.__version__}, fairseq {fairseq.__version__}, fairseq_pskd {fairseq_pskd.__version__}")'
