import json, sys, torch
from medtune import config, preflight
from medtune.llama4 import scout_text_config
from transformers import Llama4Config
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
cfg = config.load("params/scout.yaml")
for c in preflight.check_settings(cfg):
    print("settings:", c)
conf = Llama4Config(text_config=scout_text_config().to_dict())
for fast in (True, False):
    chk, est = preflight.check_memory(cfg.replace(llama4_fast=fast), conf)
    print("memory fast=%s:" % fast, chk.status, chk.detail, chk.fix)
# fp16 on H200, bf16 false: fine; smoke on cuda
smoke = config.load("params/smoke.yaml").replace(device="auto")
print("smoke on gpu:", [c.status + ":" + c.name for c in preflight.check_settings(smoke)])
print("versions:", preflight.check_versions())
