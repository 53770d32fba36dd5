#!/usr/bin/env bash
# The Scout rehearsal through notebooks 00-07 (device tool, carry .whl .whl-nb .carry): .whl-nb holds papermill,
# ipykernel and what they need that the device image lacks (pip download for Python 3.12, minus what the image has).
# Usage (device machine, repo root): bash scripts/device/rehearsal_h200.sh "$OUT" [rehearsal_gpu.py args]
set -uo pipefail
out=${1:?usage: rehearsal_h200.sh OUT_DIR}
shift
source scripts/device/setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-nb/*.whl || exit 1
# the kernel papermill starts must find the same packages: "python3" is ipykernel's kernelspec, argv from sys.executable
python3 -m ipykernel install --user --name python3 >/dev/null 2>&1 || true
export MEDTUNE_OUTPUTS=/tmp/rehearsal-outputs
timeout "${REHEARSAL_S:-540}" python3 scripts/device/rehearsal_gpu.py "$out" "$@" 2>&1 | tee "$out/rehearsal.log" | tail -40
echo "rehearsal exit: ${PIPESTATUS[0]}"
# A call cut off by its time limit still brings back what the run wrote (metrics.json is written after each notebook);
# the executed notebooks travel as one archive (the device returns a limited number of files).
run=$(ls -d /tmp/rehearsal-outputs/*/ 2>/dev/null | sort | tail -1)
if [ -n "$run" ]; then
  for f in metrics.json config.yaml manifest.json train_log.json; do [ -f "$run/$f" ] && cp "$run/$f" "$out/$f"; done
  tar -czf "$out/notebooks.tar.gz" -C "$run" --exclude='*.kernel.log' notebooks 2>/dev/null
  rm -rf "$out/notebooks"
fi
