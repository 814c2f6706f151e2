#!/usr/bin/env bash
# IWSLT'15 En<->De on one GPU: label-smoothing baseline vs PS-KD, same model, same budget, --fp16.
#
#   bash examples/iwslt15/run.sh [--src en --tgt de] [--raw 2015-01.tgz|en-de.tgz|DIR]
#                                [--work DIR] [--epochs N] [--alpha A] [--topk K]
#
# Not run on a GPU yet, nor on the real IWSLT'15 release (docs/RESULTS.md lists the runs made).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC=en; TGT=de; RAW=""; WORK=""; EPOCHS=60; ALPHA=0.8; TOPK=8
while [[ $# -gt 0 ]]; do
  case "$1" in
    --src) SRC="$2"; shift 2 ;; --tgt) TGT="$2"; shift 2 ;; --raw) RAW="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;; --epochs) EPOCHS="$2"; shift 2 ;;
    --alpha) ALPHA="$2"; shift 2 ;; --topk) TOPK="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
WORK="${WORK:-$ROOT/work/iwslt15-$SRC-$TGT}"
bash "$ROOT/scripts/install.sh"
source "$ROOT/scripts/_python.sh"
DATA="$WORK/data"
bash "$ROOT/scripts/prepare-iwslt15.sh" --out "$DATA" --src "$SRC" --tgt "$TGT" ${RAW:+--raw "$RAW"}

# fairseq's IWSLT Transformer (6+6 layers, d=512, ffn 1024, 4 heads), as in fairseq's IWSLT'14
# example, epoch-bounded so that a_t = a_T * t / T follows the paper; last 5 epochs averaged.
TRAIN=(--arch transformer_iwslt_de_en --share-all-embeddings --dropout 0.3
       --optimizer adam --adam-betas "(0.9,0.98)" --clip-norm 0.0 --lr 5e-4
       --lr-scheduler inverse_sqrt --warmup-updates 4000 --weight-decay 0.0001
       --max-tokens 4096 --max-epoch "$EPOCHS" --seed 1 --fp16 --label-smoothing 0.1
       --keep-last-epochs 5)
"$PY" -m fairseq_pskd.experiment run --prepared "$DATA" --out "$WORK/baseline" --name baseline \
  --average-last 5 -- "${TRAIN[@]}" --criterion label_smoothed_cross_entropy
"$PY" -m fairseq_pskd.experiment run --prepared "$DATA" --out "$WORK/pskd" --name PS-KD \
  --average-last 5 -- "${TRAIN[@]}" --criterion pskd --pskd-alpha "$ALPHA" --pskd-topk "$TOPK"
"$PY" -m fairseq_pskd.experiment table "$WORK/baseline/results.json" "$WORK/pskd/results.json"
