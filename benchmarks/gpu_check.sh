#!/usr/bin/env bash
# The GPU checks in one script, for a GPU machine that may have no network (Python 3.12 with
# torch, no fairseq). Under 10 minutes on one H200 with the defaults.
#
# 1. Here, with network, once:
#      bash benchmarks/gpu_check.sh --fetch     # wheels for fairseq and what that image lacks -> .whl/
#      bash scripts/prepare-multi30k.sh --out work/quickstart/data/multi30k-de-en --src de --tgt en
# 2. On the GPU machine (copy .whl and, of work/quickstart/data/multi30k-de-en, data-bin, ref,
#    spm.model and prepare.json: about 25 MB in all):
#      bash benchmarks/gpu_check.sh --out "$OUT" [--epochs 10] [--rounds 3]
#
# What it runs (work in --work, default /tmp/pskd-gpu-check); --out gets the summaries below and
# gpu-check.tgz with every log and result file (no checkpoints), so that a few files carry it
# all back:
#   store-cuda.txt      tests/test_store_cuda.py: the store's CUDA write path (one packed
#                       non-blocking copy, no sync in the caller, rows read back exactly), and
#                       the loss from the logits on CUDA against the CPU (test_loss_from_logits.py)
#   loss-gpu.txt        benchmarks/loss_bench.py on CUDA, fp16 logits: the loss alone, fairseq's
#                       label smoothing against PS-KD on both paths, each remainder
#   throughput-gpu.*    benchmarks/throughput.py --fp16, k = 8 and 32, each remainder, against
#                       label smoothing: words/s ratios, peak CUDA memory, syncs caused by the loss
#   recipe.*            the Multi30k recipe's model (examples/multi30k/run.sh) with --fp16 for
#                       --epochs epochs, baseline then PS-KD, scored: a short real run
# Status: the --fetch step and the CPU side have been run, the GPU steps not yet.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/work/gpu-check}"; WORK=/tmp/pskd-gpu-check; EPOCHS=10; ROUNDS=3; FETCH=0
DATA="work/quickstart/data/multi30k-de-en"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --fetch) FETCH=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $FETCH == 1 ]]; then
  # fairseq's runtime needs that a bare GPU image (Python 3.12 and torch) lacks;
  # the versions are the ones scripts/install.sh installs here. antlr4 4.9.3 exists only as an
  # sdist: built into a pure-Python wheel here.
  set -e
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl ve-fairseq==0.12.3 hydra-core==1.3.8 omegaconf==2.3.1 bitarray==3.12.3 sacremoses==0.2.0
  python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
  ls -la .whl
  echo "[gpu_check] wheels in .whl/; now run this script on the GPU machine, carrying .whl and $DATA/{data-bin,ref,spm.model,prepare.json}"
  exit 0
fi

mkdir -p "$OUT" "$WORK"
[[ -d .whl ]] || { echo "[gpu_check] no .whl/: run 'bash benchmarks/gpu_check.sh --fetch' where there is network, and carry .whl" >&2; exit 2; }
[[ -f "$DATA/data-bin/dict.en.txt" ]] || { echo "[gpu_check] no prepared Multi30k at $DATA: prepare it first (see --help) and carry it" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pskd-site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/pskd-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
step() { echo "[gpu_check] $(( $(date +%s) - START ))s: $*"; }
FAIL=0

step "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, fairseq, fairseq_pskd; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('fairseq', fairseq.__version__)"
} 2>&1 | tee "$WORK/environment.txt" || FAIL=1

step "store CUDA path (tests/test_store_cuda.py)"
python3 -m pytest -q -p no:cacheprovider tests/test_store_cuda.py tests/test_loss_from_logits.py -k "cuda" 2>&1 \
  | tee "$WORK/store-cuda.txt" | tail -3
[[ ${PIPESTATUS[0]} == 0 ]] || FAIL=1

step "the loss alone on CUDA, fp16 logits (benchmarks/loss_bench.py)"
python3 benchmarks/loss_bench.py --device cuda --dtype float16 --tokens 16000 --vocab 32000 --rounds 10 \
  --threads 0 2>&1 | tee "$WORK/loss-gpu.txt" | grep -v Warning
[[ ${PIPESTATUS[0]} == 0 ]] || FAIL=1

step "throughput, --fp16, $ROUNDS rounds"
python3 benchmarks/throughput.py --data-bin "$DATA/data-bin" --topk 8 32 --remainder uniform current renormalize \
  --rounds "$ROUNDS" --steps 100 --warmup 10 --fp16 --json "$WORK/throughput-gpu.json" 2>&1 \
  | tee "$WORK/throughput-gpu.txt" | grep -v Warning
[[ ${PIPESTATUS[0]} == 0 ]] || FAIL=1

step "recipe: Multi30k, examples/multi30k model, --fp16, $EPOCHS epochs, baseline then PS-KD"
# the model and optimiser of examples/multi30k/run.sh, a short budget
TRAIN=(--arch transformer --share-all-embeddings --encoder-layers 3 --decoder-layers 3
       --encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 1024
       --decoder-ffn-embed-dim 1024 --encoder-attention-heads 4 --decoder-attention-heads 4
       --dropout 0.3 --optimizer adam --adam-betas "(0.9,0.98)" --clip-norm 0.0 --lr 1e-3
       --lr-scheduler inverse_sqrt --warmup-updates 1000 --weight-decay 0.0001
       --max-tokens 4096 --max-epoch "$EPOCHS" --seed 1 --fp16 --label-smoothing 0.1 --keep-last-epochs 1)
for run in baseline pskd; do
  if [[ $run == baseline ]]; then CRIT=(--criterion label_smoothed_cross_entropy)
  else CRIT=(--criterion pskd --pskd-alpha 0.8 --pskd-topk 8); fi
  python3 -m fairseq_pskd.experiment run --prepared "$DATA" --out "$WORK/recipe-$run" --name "$run" \
    -- "${TRAIN[@]}" "${CRIT[@]}" > "$WORK/recipe-$run.log" 2>&1 || { FAIL=1; tail -20 "$WORK/recipe-$run.log"; }
  step "recipe $run done"
done
python3 -m fairseq_pskd.experiment table "$WORK/recipe-baseline/results.json" "$WORK/recipe-pskd/results.json" \
  2>&1 | tee "$WORK/recipe-table.txt" || FAIL=1
step "done (failures: $FAIL)"
cp "$WORK"/{environment,store-cuda,loss-gpu,throughput-gpu,recipe-table}.txt "$OUT"/ 2>/dev/null
tar -czf "$OUT/gpu-check.tgz" -C "$WORK" --exclude=checkpoints --exclude=pskd_store .
exit $FAIL
