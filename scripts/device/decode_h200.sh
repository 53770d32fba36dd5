#!/usr/bin/env bash
# One device call for the decode work (device tool, carry .whl): versions, the fused-kernel checks and tile sweep,
# greedy equality on 2 layers, then the generation benchmark at GEN_LAYERS layers (default 48).
# Usage (device machine, repo root): bash scripts/device/decode_h200.sh "$OUT" [extra bench args]
# Env: SWEEP=1 tile sweep, PROFILE=1 kernel profile of eager decode steps, SKIP_CHECKS=1, SKIP_BENCH=1,
# GREEDY_ONLY=1 (decode_gpu.py's greedy equality alone), KERNELS=1 (or KERNELS=--quick) the per-projection kernel comparison inside CUDA graphs (decode_kernels.py).
set -uo pipefail
out=${1:?usage: decode_h200.sh OUT_DIR}
shift
source scripts/device/setup.sh
if [ "${SKIP_CHECKS:-0}" != 1 ]; then
  timeout "${CHECK_S:-240}" python3 scripts/device/decode_gpu.py "$out" ${SWEEP:+--sweep} ${PROFILE:+--profile} ${GREEDY_ONLY:+--greedy-only} 2>&1 | tee "$out/decode_gpu.log" | tail -40
  echo "decode_gpu exit: ${PIPESTATUS[0]}"
fi
if [ -n "${KERNELS:-}" ]; then
  timeout "${KERNELS_S:-240}" python3 scripts/device/decode_kernels.py "$out" ${KERNELS#1} 2>&1 | grep -v Warning | tee "$out/decode_kernels.log" | tail -40
  echo "decode_kernels exit: ${PIPESTATUS[0]}"
fi
[ -f "$out/fused_max_rows" ] && export MEDTUNE_NF4_FUSED_MAX_ROWS=$(cat "$out/fused_max_rows") && echo "fused_max_rows=$MEDTUNE_NF4_FUSED_MAX_ROWS"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_S:-400}" python3 -m medtune.bench --generate --out "$out" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$out/bench_generate.log" | tail -40
  echo "bench exit: ${PIPESTATUS[0]}"
fi
