"""Triton NF4 dequantize (medtune.llama4.kernels.nf4_dequantize) vs bitsandbytes' CUDA kernel, on the GPU box.

``python scripts/device/check_triton_dequant.py OUTDIR``: one Scout-shaped layer of NF4 experts (16 x 5120 x 16384
gate_up, 16 x 8192 x 5120 down), without and with double quant, fresh random weights: bit-identical outputs (all
experts and a 3-expert slice), time per whole-layer dequantize (CUDA events, median of 20 after 5) and GB/s
(packed + absmax read, bf16 written), and the routed block's forward + backward (4,096 tokens) with each kernel.
Writes OUTDIR/triton_dequant.json, and OUTDIR/triton_ok only if every comparison is bit-identical.
"""

import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from medtune import llama4 as l4

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/bench/triton")
OUT.mkdir(parents=True, exist_ok=True)


def timed(fn, reps=20, warm=5):
    ts = []
    for i in range(warm + reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        if i >= warm:
            ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def fwd_bwd(moe, x, w):
    x = x.detach().requires_grad_(True)
    out, _ = moe(x)
    (g,) = torch.autograd.grad((out.float() * w).sum(), x)
    return out.detach(), g


res, ok = {}, True
torch.manual_seed(1)
cfg = l4.scout_text_config(num_hidden_layers=1)
with torch.device("cuda"):
    dense = Llama4TextMoe(cfg).to(torch.bfloat16)
for p in dense.parameters():
    p.data.normal_(0, 0.02)
dense.requires_grad_(False)
for dq in (False, True):
    moe = copy.deepcopy(dense)
    l4.prepare_moe(moe, double_quant=dq)
    e = moe.experts
    r = {}
    for name in ("gate_up", "down"):
        e.triton_dequant = False
        ref, ref_slice = e.dequantize_experts(name), e.dequantize_experts(name, 5, 8)
        t_bnb = timed(lambda: e.dequantize_experts(name))
        e.triton_dequant = True
        got, got_slice = e.dequantize_experts(name), e.dequantize_experts(name, 5, 8)
        t_tri = timed(lambda: e.dequantize_experts(name))
        same = torch.equal(got, ref) and torch.equal(got_slice, ref_slice)
        ok &= same
        nbytes = getattr(e, f"{name}_packed").numel() * 5 + getattr(e, f"{name}_absmax").numel() * 4
        r[name] = dict(bit_identical=same, bnb_ms=t_bnb, triton_ms=t_tri, bnb_GBps=nbytes / t_bnb / 1e6,
                       triton_GBps=nbytes / t_tri / 1e6)
        del ref, got, ref_slice, got_slice
    x = torch.randn(1, 4096, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 5120, device="cuda")
    e.triton_dequant = False
    o_ref, g_ref = fwd_bwd(moe, x, w)
    r["block_bnb_ms"] = timed(lambda: fwd_bwd(moe, x, w), reps=10, warm=3)
    e.triton_dequant = True
    o, g = fwd_bwd(moe, x, w)
    r["block_triton_ms"] = timed(lambda: fwd_bwd(moe, x, w), reps=10, warm=3)
    r["block_bit_identical"] = bool(torch.equal(o, o_ref) and torch.equal(g, g_ref))
    ok &= r["block_bit_identical"]
    res[f"double_quant={dq}"] = r
    print(f"double_quant={dq}", json.dumps(r), flush=True)
    torch.cuda.empty_cache()
(OUT / "triton_dequant.json").write_text(json.dumps(res, indent=2))
if ok:
    (OUT / "triton_ok").write_text("ok\n")
print("TRITON_DEQUANT", "OK" if ok else "FAILED")
