#!/usr/bin/env bash
# One device call for the real-rows training work (device tool, carry .whl .carry): versions, then
# scripts/device/train_gpu.py (per-layer variants, profile, host syncs, the full-depth model on the real lengths).
# Usage (device machine, repo root): bash scripts/device/train_h200.sh "$OUT" [train_gpu.py args]
set -uo pipefail
out=${1:?usage: train_h200.sh OUT_DIR}
shift
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/env.txt"
python3 -c "import torch, transformers, peft, trl, bitsandbytes, datasets, triton, pyarrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__, 'datasets', datasets.__version__, 'triton', triton.__version__, 'pyarrow', pyarrow.__version__)" 2>&1 | tail -3 | tee -a "$out/env.txt"
date -u +%FT%TZ | tee -a "$out/env.txt"
timeout "${TRAIN_S:-480}" python3 scripts/device/train_gpu.py "$out" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$out/train_gpu.log" | tail -60
echo "train_gpu exit: ${PIPESTATUS[0]}"
