#!/usr/bin/env bash
# One device call that re-checks the Llama 4 path of the current code on one H200 (device tool, carry .whl .carry):
# versions, the benchmark at 4,096 tokens (both setups, 1- and 3-layer models, then the full 48-layer medtune model
# with and without double quant), and medtune's own pipeline functions on a 2-layer Scout-shaped checkpoint.
# Usage (device machine, repo root): bash scripts/device/verify_h200.sh "$OUT"
set -uo pipefail
out=${1:?usage: verify_h200.sh OUT_DIR}
source scripts/device/setup.sh
timeout "${BENCH_S:-360}" python3 -m medtune.bench --tokens 4096 --layers 1 3 --steps 3 --full 48 --full-steps 3 \
  --no-profile --out "$out/bench" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$out/bench.log"
echo "bench exit: ${PIPESTATUS[0]}"
timeout "${PIPELINE_S:-180}" python3 scripts/device/pipeline_gpu.py "$out/pipeline" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$out/pipeline.log"
echo "pipeline exit: ${PIPESTATUS[0]}"
