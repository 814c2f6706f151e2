#!/usr/bin/env bash
# Multi30k De->En on one GPU: label-smoothing baseline vs PS-KD, same model, same budget, --fp16.
#
#   bash examples/multi30k/run.sh [--work DIR] [--raw DIR] [--epochs N] [--alpha A] [--topk K]
#
# Not run on a GPU yet: the figures in docs/RESULTS.md say which runs were made on what. Each step resumes/skips when rerun.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$ROOT/work/multi30k-gpu"; RAW=""; EPOCHS=60; ALPHA=0.8; TOPK=8
while [[ $# -gt 0 ]]; do
  case "$1" in
    --work) WORK="$2"; shift 2 ;; --raw) RAW="$2"; shift 2 ;; --epochs) EPOCHS="$2"; shift 2 ;;
    --alpha) ALPHA="$2"; shift 2 ;; --topk) TOPK="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
bash "$ROOT/scripts/install.sh"
source "$ROOT/scripts/_python.sh"
DATA="$WORK/data"
bash "$ROOT/scripts/prepare-multi30k.sh" --out "$DATA" --src de --tgt en ${RAW:+--raw "$RAW"}

# A 3-layer Transformer (d=256): Multi30k has 29k sentence pairs, a base model overfits at once.
# Epoch-bounded (--max-epoch) so that a_t = a_T * t / T follows the paper; the last 5 epoch
# checkpoints are averaged for both systems.
TRAIN=(--arch transformer --share-all-embeddings --encoder-layers 3 --decoder-layers 3
       --encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 1024
       --decoder-ffn-embed-dim 1024 --encoder-attention-heads 4 --decoder-attention-heads 4
       --dropout 0.3 --optimizer adam --adam-betas "(0.9,0.98)" --clip-norm 0.0 --lr 1e-3
       --lr-scheduler inverse_sqrt --warmup-updates 1000 --weight-decay 0.0001
       --max-tokens 4096 --max-epoch "$EPOCHS" --seed 1 --fp16 --label-smoothing 0.1
       --keep-last-epochs 5)
"$PY" -m fairseq_pskd.experiment run --prepared "$DATA" --out "$WORK/baseline" --name baseline \
  --average-last 5 --test-subsets test,test1,test2 -- "${TRAIN[@]}" --criterion label_smoothed_cross_entropy
"$PY" -m fairseq_pskd.experiment run --prepared "$DATA" --out "$WORK/pskd" --name PS-KD \
  --average-last 5 --test-subsets test,test1,test2 -- "${TRAIN[@]}" --criterion pskd \
  --pskd-alpha "$ALPHA" --pskd-topk "$TOPK"
"$PY" -m fairseq_pskd.experiment table "$WORK/baseline/results.json" "$WORK/pskd/results.json"
