# Sourced by benchmarks/gpu_check.sh and scripts/gpu_train.sh (from the repository root): picks the Python
# ($PYTHON, else .venv/bin/python, else python3) as PY and, on a GPU machine without internet, installs the
# project's dependencies from a carried folder of wheels for its Python (GPU_WHEELS, default gpu-wheels/;
# `make gpu-wheels PYVER=3.12` downloads them here) with --no-deps into a private folder put first on
# PYTHONPATH, so the machine's own CUDA torch is used untouched. With OUT set, output is also logged to
# $OUT/$GPU_LOG.
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

LOG=/dev/null
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT"; LOG=$OUT/${GPU_LOG:-gpu.log}; fi
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
"$PY" - <<'PYEOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, bf16: {torch.cuda.is_bf16_supported()}")
PYEOF
