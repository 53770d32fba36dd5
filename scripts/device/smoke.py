"""CUDA bf16 correctness + timing of medtune.llama4's MoE paths on one Scout-shaped MoE block (run on the GPU box).

Checks, on fresh random inputs: sparse (per-expert loop and torch._grouped_mm) vs transformers' dense
Llama4TextMoe, outputs and input gradients (bf16: relative error < 2e-2); NF4 experts vs the same MoE with
dequantize(quantize(W)) weights. Times forward + backward w.r.t. the input (median of 5, CUDA-synchronized).
"""

import copy
import statistics
import sys
import time

import torch
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from medtune import llama4 as l4


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(moe, x, w):
    x = x.detach().requires_grad_(True)
    out, _ = moe(x)
    (g,) = torch.autograd.grad((out.float() * w).sum(), x)
    return out.detach(), g


def bench(moe, x, w):
    ts = []
    for _ in range(7):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(moe, x, w)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[2:]) * 1e3


torch.manual_seed(0)
cfg = l4.scout_text_config(num_hidden_layers=1)
with torch.device("cuda"):
    dense = Llama4TextMoe(cfg).to(torch.bfloat16)
for p in dense.parameters():
    p.data.normal_(0, 0.02)
dense.requires_grad_(False)
loop = copy.deepcopy(dense)
l4.prepare_moe(loop, quantize_experts=False)
loop.experts.use_grouped_mm = False
grouped = copy.deepcopy(dense)
l4.prepare_moe(grouped, quantize_experts=False)
nf4 = copy.deepcopy(dense)
l4.prepare_moe(nf4, quantize_experts=True)
rt = copy.deepcopy(loop)
gu, dn = nf4.experts.dequantized_weights()
rt.experts.gate_up_proj.data.copy_(gu)
rt.experts.down_proj.data.copy_(dn)
ok = True
for tokens in (4096, 16384):
    x = torch.randn(1, tokens, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(tokens, 5120, device="cuda")
    ref = run(dense, x, w)
    row = {"tokens": tokens}
    for name, m in (("loop", loop), ("grouped_mm", grouped)):
        o, g = run(m, x, w)
        row[name] = (rel(o, ref[0]), rel(g, ref[1]))
        ok &= row[name][0] < 2e-2 and row[name][1] < 2e-2
    o, g = run(nf4, x, w)
    ro, rg = run(rt, x, w)
    row["nf4_vs_roundtrip"] = (rel(o, ro), rel(g, rg))
    ok &= max(row["nf4_vs_roundtrip"]) < 2e-2
    row["nf4_vs_bf16"] = (rel(o, ref[0]), rel(g, ref[1]))
    paths = (("dense", dense), ("loop", loop), ("grouped_mm", grouped), ("nf4", nf4))
    row["ms"] = {n: round(bench(m, x, w), 2) for n, m in paths}
    print(row, flush=True)
print("layer GiB: bf16 experts", round(l4.weights_gib(dense.experts), 3), "nf4", round(l4.weights_gib(nf4.experts), 3))
print("SMOKE", "OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
