# Sourced by the device scripts (bash scripts/device/<name>_h200.sh "$OUT"): installs the carried wheels (.whl/, see
# the device README) into /tmp/site, puts them and the repo on PYTHONPATH, and records the GPU, the versions of what
# the benchmarks import (or "missing") and the date in "$out/env.txt". Expects $out to be set.
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/env.txt"
python3 - <<'PY' 2>&1 | tee -a "$out/env.txt"
import importlib
parts = []
for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "triton", "pyarrow"):
    try:
        parts.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # a package this call did not carry, or one that fails to import: say so, go on
        parts.append(f"{name} missing ({type(err).__name__})")
import torch
print(", ".join(parts), "| cuda", torch.version.cuda)
PY
date -u +%FT%TZ | tee -a "$out/env.txt"
