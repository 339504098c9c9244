#!/usr/bin/env bash
# HQG-Net in the paper configuration, trained in one short GPU lease (issue 11): prepare the release data,
# pretrain G and train HQG-Net within MINUTES (G a quarter), export fp16 weights with a card that names the
# GPU, build the guidance cache and score the validation pairs. The run lives in a temporary folder; what
# comes back from a device call (at most 8 files of 16 MiB, flat) is copied to $OUT: gpu_train.log, the
# card, G's card, the loss log, the guidance cache, validation.json and the weights when they fit (lite:
# 13.6 MB; paper: 133 MB fp16, which cannot come back: its run is for the figures and the card). Nothing is
# written to models/weights: a model is shipped only after `dicomnode evaluate --holdout` says it helps.
#
#   OUT=/path bash scripts/gpu_train.sh             # on a GPU machine (MINUTES, default 7)
#   bash scripts/gpu_train.sh --dry-run             # on the CPU: the lite configuration for seconds (CI)
#
# TARGET: ccm (default) or color. DATA: the training images (../shared/data/train layout; default
# ../shared/data/train, else gpu-data/train, which `make gpu-train-kit` fills with the CCM training set to
# be carried to the GPU machine with gpu-wheels-train/, GPU_WHEELS=gpu-wheels-train). Python and wheels:
# benchmarks/gpu_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
GPU_LOG=gpu_train.log
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh

TARGET=${TARGET:-ccm}
if [[ -z "${DATA:-}" ]]; then
  for d in ../shared/data/train gpu-data/train; do
    if [[ -d "$d/$TARGET" || ( $TARGET == color && -d "$d/fundus" ) ]]; then DATA=$d; break; fi
  done
fi
if [[ -z "${DATA:-}" ]]; then
  echo "no training data: set DATA, or run \`make gpu-train-kit\` here and carry gpu-data to the GPU machine" >&2
  exit 2
fi
ROOT=$(mktemp -d /tmp/dicomnode-gpu-train.XXXX)
WORK=$ROOT/run
WEIGHTS=$ROOT/weights

if [[ $DRY == 1 ]]; then
  DEVICE=cpu; CONFIG=lite; MIN=${MINUTES:-0.1}; SIZE=64
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run on a CPU')"
  DEVICE=cuda; CONFIG=${CONFIG:-paper}; MIN=${MINUTES:-7}; SIZE=192
fi
case $TARGET in
  ccm) EXPORT=(--field-smoothing 0.1 --color-mode full) ;;
  *) EXPORT=(--field-smoothing 0.05 --color-mode luminance) ;;
esac
RW=("$PY" scripts/release_weights.py --target "$TARGET" --work "$WORK" --data "$DATA" --device "$DEVICE")

echo "== prepare $TARGET from $DATA"
"${RW[@]}" prepare
echo "== train: $CONFIG configuration on $DEVICE for $MIN minutes (G a quarter, then HQG-Net)"
start=$(date +%s)
"${RW[@]}" train --config "$CONFIG" --size "$SIZE" --minutes "$MIN" --g-steps 1000000 --steps 1000000
echo "== trained in $(( $(date +%s) - start )) s"
echo "== export (fp16, card) and guidance cache"
"${RW[@]}" export --weights-dir "$WEIGHTS" "${EXPORT[@]}"
echo "== validation pairs (training split)"
"${RW[@]}" validate --weights-dir "$WEIGHTS"
"$PY" - "$WEIGHTS/hqgnet-$TARGET.json" <<'PYEOF'
import json, sys
card = json.load(open(sys.argv[1]))
print(f"card: {card['config']['name']} configuration, {card['iterations']} iterations, G {card['g']['iterations']} "
      f"iterations, hardware {card['hardware']}")
PYEOF
if [[ -n "${OUT:-}" ]]; then
  cp "$WEIGHTS/hqgnet-$TARGET.json" "$WEIGHTS"/hqgnet-"$TARGET".guidance-*.json "$OUT/"
  cp "$WORK/$TARGET/g/g.json" "$OUT/g-card.json"
  cp "$WORK/$TARGET/hqgnet/log.csv" "$OUT/hqgnet-log.csv"
  cp "$WORK/$TARGET/validation/validation.json" "$OUT/validation.json"
  if (( $(stat -c %s "$WEIGHTS/hqgnet-$TARGET.pt") <= 16 * 1024 * 1024 )); then
    cp "$WEIGHTS/hqgnet-$TARGET.pt" "$OUT/"
  else
    echo "weights $(du -h "$WEIGHTS/hqgnet-$TARGET.pt" | cut -f1): over the 16 MiB a device call returns, not copied to OUT"
  fi
  echo "== results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
echo "== done ($( [[ $DRY == 1 ]] && echo 'dry run on the CPU' || echo 'GPU' )): $ROOT"
