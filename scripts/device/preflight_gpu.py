"""Preflight on a real GPU (one H200): the CUDA branches that the CPU tests monkeypatch.

check_settings with real torch.cuda (bf16 support, bitsandbytes 4-bit probe on cuda) and check_memory with
real mem_get_info for Scout on the medtune path (fits) and the walkthrough path (does not). No network: the
config is Scout's dimensions (scout_text_config). Run as docs/bench-h200.md's "Reproduce" says:
``python3 scripts/device/preflight_gpu.py``. Seen 2026-11-29 on one H200 (torch 2.11 cu130): settings ok;
memory 66.6 GiB needed of 139.2 free (fast), 196.9 GiB (walkthrough) -> error naming llama4_fast: true.
"""
import torch
from transformers import Llama4Config

from medtune.llama4 import scout_text_config
from medtune.settings import config
from medtune.stages import preflight

print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
cfg = config.load("params/scout.yaml")
for c in preflight.check_settings(cfg):
    print("settings:", c)
conf = Llama4Config(text_config=scout_text_config().to_dict())
for fast in (True, False):
    chk, est = preflight.check_memory(cfg.replace(llama4_fast=fast), conf)
    print(f"memory fast={fast}:", chk.status, chk.detail, chk.fix)
# fp16 on H200, bf16 false: fine; smoke on cuda
smoke = config.load("params/smoke.yaml").replace(device="auto")
print("smoke on gpu:", [c.status + ":" + c.name for c in preflight.check_settings(smoke)])
print("versions:", preflight.check_versions())
