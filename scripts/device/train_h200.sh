#!/usr/bin/env bash
# One device call for the real-rows training work (device tool, carry .whl .carry): versions, then
# scripts/device/train_gpu.py (kernel check, the full-depth model on the real lengths, expert LoRA, profile, per-layer).
# Usage (device machine, repo root): bash scripts/device/train_h200.sh "$OUT" [train_gpu.py args]
set -uo pipefail
out=${1:?usage: train_h200.sh OUT_DIR}
shift
source scripts/device/setup.sh
timeout "${TRAIN_S:-480}" python3 scripts/device/train_gpu.py "$out" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$out/train_gpu.log" | tail -60
echo "train_gpu exit: ${PIPESTATUS[0]}"
