#!/usr/bin/env bash
# Where PS-KD pays: `quickstart.sh --long` on random subsets of Multi30k's training data
# (docs/RESULTS.md, "The learning curve").
#
#   bash scripts/learning-curve.sh [--raw DIR] [--sizes 3625,7250,14500] [--work DIR] [--full DIR]
#
# For each size N (training pairs; default 1/8, 1/4 and 1/2 of the 29,000): the label-smoothing
# baseline and PS-KD a_T 0.4 and 0.8, seeds 1 and 2, trained as `quickstart.sh --long
# --train-size N` trains them (round(40 * sqrt(29,000 / N)) epochs, the schedule scaled to the
# measured updates per epoch, last-5 average), each
# scored at lenpen 1 and at the one chosen on validation, in WORK/nN (default
# work/learning-curve). Two runs at a time, one per half of the cores; the smallest size first.
# Rerunning resumes: finished runs are skipped, a killed one resumes from its checkpoint.
# --raw DIR: a local copy of Multi30k's data/task1/raw files (default: download them). --full
# DIR: the work directory of `quickstart.sh --long` (all 29,000 pairs), drawn as the last point.
# Then the table (WORK/learning-curve.txt) and dBLEU, dNLL, dECE against the size
# (WORK/learning-curve.png): python -m fairseq_pskd.learning_curve.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RAW=""; SIZES="3625,7250,14500"; WORK="work/learning-curve"; FULL=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --raw|--sizes|--work|--full) [[ $# -ge 2 ]] || { echo "learning-curve.sh: $1 needs a value" >&2; exit 2; } ;;
  esac
  case "$1" in
    --raw) RAW="$2"; shift 2 ;;
    --sizes) SIZES="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --full) FULL="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "learning-curve.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$SIZES" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || {
  echo "learning-curve.sh: --sizes needs comma-separated numbers of training pairs, not '$SIZES'" >&2; exit 2; }

START=$(date +%s)
IFS=, read -r -a SIZE_LIST <<< "$SIZES"
for n in "${SIZE_LIST[@]}"; do
  echo "[learning-curve] $(date +%H:%M) $n training pairs: baseline, PS-KD a_T 0.4 and 0.8, seeds 1 and 2 in $WORK/n$n"
  bash scripts/quickstart.sh --long --train-size "$n" --alphas 0.4,0.8 --work "$WORK/n$n" ${RAW:+--raw "$RAW"}
done
source "$ROOT/scripts/_python.sh"
RUNS=()
for n in "${SIZE_LIST[@]}"; do RUNS+=("$WORK/n$n"/{baseline,pskd-a0.4,pskd-a0.8}-s{1,2}); done
# --full DIR: the full-data runs of `quickstart.sh --long` (its work directory), as the last point
if [[ -n "$FULL" ]]; then
  for run in "$FULL"/*-s[0-9]*; do [[ -f "$run/results.json" ]] && RUNS+=("$run"); done
fi
"$PY" -m fairseq_pskd.learning_curve "${RUNS[@]}" --paired-bs --png "$WORK/learning-curve.png" \
  --json "$WORK/learning-curve.json" | tee "$WORK/learning-curve.txt"
echo "[learning-curve] done in $(( ($(date +%s) - START) / 60 )) min; curve: $WORK/learning-curve.png"
