#!/usr/bin/env bash
# The GPU path in one short run (well under 8 minutes on an H100/H200): the CUDA tests, then the figures
# for docs/performance.md. Prints everything; with OUT set, also writes $OUT/gpu_check.log.
#
#   bash benchmarks/gpu_check.sh             # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # on the CPU, tiny sizes: what CI runs so this never rots
#
# Python: $PYTHON, else .venv/bin/python, else python3. A GPU machine without internet gets the project's
# pure-Python and binary dependencies from a carried folder of wheels for its Python (GPU_WHEELS,
# default gpu-wheels/; `make gpu-wheels PYVER=3.12` downloads them here): they are installed with
# --no-deps into a private folder put first on PYTHONPATH, so the machine's own torch is used untouched.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

LOG=/dev/null
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT"; LOG=$OUT/gpu_check.log; fi
exec > >(tee -a "$LOG") 2>&1

WHEELS=${GPU_WHEELS:-gpu-wheels}
if [[ -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  DEPS=$(mktemp -d /tmp/dicomnode-gpu-deps.XXXX)
  echo "== installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $DEPS"
  "$PY" -m pip install -q --no-index --no-deps --target "$DEPS" "$WHEELS"/*.whl
  export PYTHONPATH="$DEPS:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

echo "== environment"
"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, bf16: {torch.cuda.is_bf16_supported()}")
EOF

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
