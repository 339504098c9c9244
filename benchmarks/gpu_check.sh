#!/usr/bin/env bash
# The GPU path in one short run (well under 8 minutes on an H100/H200): the CUDA tests, then the figures
# for docs/performance.md. Prints everything; with OUT set, also writes $OUT/gpu_check.log.
#
#   bash benchmarks/gpu_check.sh             # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # on the CPU, tiny sizes: what CI runs so this never rots
#
# Python and the carried wheels: benchmarks/gpu_env.sh (shared with scripts/gpu_train.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
GPU_LOG=gpu_check.log
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh

if [[ $DRY == 1 ]]; then
  export DICOMNODE_GPU_DRY_RUN=1
  DEVICE=cpu; SMALL=64; LARGE=96; BATCHES="1 2"; CONFIGS="lite"; COMPILE=""; REPEATS=1
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run on a CPU')"
  DEVICE=cuda; SMALL=384; LARGE=2048; BATCHES="1 16 64"; CONFIGS="paper lite"; COMPILE="--compile"; REPEATS=5
fi

echo "== CUDA tests (bf16 autocast + channels_last vs fp32, torch.compile, the node serving a series on $DEVICE)"
"$PY" -m pytest -q -p no:cacheprovider -m cuda -s tests/test_cuda.py

echo "== HQG-Net inference at ${SMALL}x${SMALL} (img/s = 1 / E_gen s/img)"
# shellcheck disable=SC2086
"$PY" benchmarks/bench_hqgnet.py --device "$DEVICE" --size "$SMALL" --configs $CONFIGS --batches $BATCHES \
  --repeats "$REPEATS" $COMPILE
echo "== HQG-Net inference at ${LARGE}x${LARGE}"
# shellcheck disable=SC2086
"$PY" benchmarks/bench_hqgnet.py --device "$DEVICE" --size "$LARGE" --configs $CONFIGS --batches 1 --repeats "$REPEATS"

echo "== done ($( [[ $DRY == 1 ]] && echo 'dry run on the CPU' || echo 'GPU' ))"
