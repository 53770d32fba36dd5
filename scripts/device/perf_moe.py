"""Old vs new NF4 routed-expert path on one GPU: correctness (bf16) and timing, then model-level variants.

Run on the GPU box from the repo root: ``python scripts/device/perf_moe.py OUTDIR``. Writes OUTDIR/perf_moe.json and
OUTDIR/profile.txt, prints a short table last.

A. One Scout-shaped MoE (16 experts, hidden 5120, expert dim 8192), 4,096 tokens, bf16, frozen weights, forward +
   backward w.r.t. the input: the NF4 path before this change (scripts/device/llama4_before.py: 16 per-expert
   dequantize calls per projection, per-expert matmuls) vs now (one dequantize call per projection,
   torch._grouped_mm, no host sync), with and without double quant; bf16 grouped_mm as the floor. Relative
   output / input-gradient differences vs the old path and vs bf16 experts holding dequantize(quantize(W)).
   Dequantize alone: 32 per-expert calls vs 2 whole-layer calls (GB/s = packed + absmax read, bf16 written).
B. Scout-shaped 1- and 3-layer models, LoRA + gradient checkpointing + TRL fused head, medtune's bench step:
   skip_recompute on/off, dequant_group all/8, double quant off/on: step ms, ms/layer, peak GiB, and the
   number of dequantize calls in one step of the 1-layer model (6 before, 4 with the recompute skipped).
C. torch.profiler table of one 2-layer training step (CUDA time by kernel).
Times: CUDA events, median of 10 after 3 warm-ups.
"""

import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from medtune import bench
from medtune import llama4 as l4
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/bench/perf")
OUT.mkdir(parents=True, exist_ok=True)
spec = importlib.util.spec_from_file_location("llama4_before", Path(__file__).with_name("llama4_before.py"))
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(fn, reps=10, warm=3):
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


# ---------------------------------------------------------------- A
torch.manual_seed(0)
cfg = l4.scout_text_config(num_hidden_layers=1)
with torch.device("cuda"):
    dense = Llama4TextMoe(cfg).to(torch.bfloat16)
for p in dense.parameters():
    p.data.normal_(0, 0.02)
dense.requires_grad_(False)
tokens = 4096
rows = {}
ok = True
for dq in (False, True):
    new_m = copy.deepcopy(dense); l4.prepare_moe(new_m, double_quant=dq)
    old_m = copy.deepcopy(dense); old.prepare_moe(old_m, double_quant=dq)
    rt = copy.deepcopy(dense); l4.prepare_moe(rt, quantize_experts=False)
    gu, dn = new_m.experts.dequantized_weights()
    rt.experts.gate_up_proj.data.copy_(gu); rt.experts.down_proj.data.copy_(dn); del gu, dn
    for trial in range(2):  # fresh inputs
        x = torch.randn(1, tokens, 5120, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(tokens, 5120, device="cuda")
        o_new, g_new = fwd_bwd(new_m, x, w)
        o_old, g_old = fwd_bwd(old_m, x, w)
        o_rt, g_rt = fwd_bwd(rt, x, w)
        r = dict(out_vs_old=rel(o_new, o_old), grad_vs_old=rel(g_new, g_old), out_vs_roundtrip_bf16=rel(o_new, o_rt),
                 grad_vs_roundtrip_bf16=rel(g_new, g_rt), finite=bool(torch.isfinite(o_new).all() and torch.isfinite(g_new).all()))
        ok &= r["finite"] and max(r["out_vs_old"], r["grad_vs_old"], r["out_vs_roundtrip_bf16"], r["grad_vs_roundtrip_bf16"]) < 1e-2
        rows[f"dq={dq} trial={trial}"] = r
    # bit-identical dequantize vs old per-expert
    same = all(torch.equal(new_m.experts.dequantize_experts(n)[e], old_m.experts.dequantize(n, e))
               for n in ("gate_up", "down") for e in (0, 7, 15))
    ok &= same
    rows[f"dq={dq} dequant_bit_identical"] = same
    x = torch.randn(1, tokens, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(tokens, 5120, device="cuda")
    ms = {}
    ms["old_nf4"] = timed(lambda: fwd_bwd(old_m, x, w))
    ms["new_nf4_all"] = timed(lambda: fwd_bwd(new_m, x, w))
    new_m.experts.dequant_group = 8
    ms["new_nf4_group8"] = timed(lambda: fwd_bwd(new_m, x, w))
    new_m.experts.dequant_group = None
    ms["bf16_grouped_mm"] = timed(lambda: fwd_bwd(rt, x, w))
    # memory: peak extra of one fwd+bwd
    for name, m in (("old_nf4", old_m), ("new_nf4_all", new_m)):
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        fwd_bwd(m, x, w); torch.cuda.synchronize()
        ms[f"{name}_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    new_m.experts.dequant_group = 8
    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    fwd_bwd(new_m, x, w); torch.cuda.synchronize()
    ms["new_nf4_group8_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    new_m.experts.dequant_group = None
    # dequantize alone
    e = new_m.experts
    nbytes = sum(getattr(e, f"{n}_packed").numel() + getattr(e, f"{n}_absmax").numel() * e.gate_up_absmax.element_size()
                 + 2 * getattr(e, f"{n}_packed").numel() * 2 for n in ("gate_up", "down"))
    t_old = timed(lambda: [old_m.experts.dequantize(n, i) for n in ("gate_up", "down") for i in range(16)])
    t_new = timed(lambda: [e.dequantize_experts(n) for n in ("gate_up", "down")])
    ms["dequant_32_calls_ms"], ms["dequant_2_calls_ms"] = t_old, t_new
    ms["dequant_2_calls_GBps"] = nbytes / t_new / 1e6
    rows[f"dq={dq} ms"] = {k: round(v, 3) for k, v in ms.items()}
    print(f"dq={dq}", rows[f"dq={dq} ms"], flush=True)
    del new_m, old_m, rt
    torch.cuda.empty_cache()
res["A"] = rows
res["A_ok"] = ok
print("A correctness", "OK" if ok else "FAILED", json.dumps({k: v for k, v in rows.items() if "ms" not in k}), flush=True)
del dense
torch.cuda.empty_cache()

# ---------------------------------------------------------------- B
calls = []
orig_deq = l4.Llama4NF4Experts.dequantize_experts


def counting(self, *a, **k):
    calls.append(1)
    return orig_deq(self, *a, **k)


l4.Llama4NF4Experts.dequantize_experts = counting
B = []
for dq, skip, group in ((False, True, None), (False, False, None), (False, True, 8), (True, True, None)):
    l4.Llama4SparseMoe.skip_recompute = skip
    l4.Llama4NF4Experts.dequant_group = group
    runs = {}
    for n in (1, 3):
        model, _ = bench.build_model(n, "medtune", double_quant=dq)
        model = bench.add_lora_and_head(model)
        runs[n] = bench.time_training(model, 4096, steps=5, warmup=2)
        if n == 1:
            calls.clear()
            ids = torch.randint(0, 202048, (1, 4096), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
            loss.backward()
            runs["dequant_calls_per_step_1_layer"] = len(calls)
        del model
        bench.free()
    row = dict(double_quant=dq, skip_recompute=skip, dequant_group=group or 16,
               ms_per_layer=(runs[3]["step_ms"] - runs[1]["step_ms"]) / 2, step_ms_1=runs[1]["step_ms"],
               step_ms_3=runs[3]["step_ms"], peak_gib_3=runs[3]["peak_gib"],
               dequant_calls_1_layer=runs["dequant_calls_per_step_1_layer"], loss_3=runs[3]["loss_last"])
    row["projected_48_tokens_per_s"] = 4096 / (runs[1]["step_ms"] + 47 * row["ms_per_layer"]) * 1e3
    B.append(row)
    print("B", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
l4.Llama4NF4Experts.dequantize_experts = orig_deq
l4.Llama4SparseMoe.skip_recompute = True
l4.Llama4NF4Experts.dequant_group = None
res["B"] = B

# ---------------------------------------------------------------- C
model, _ = bench.build_model(2, "medtune")
model = bench.add_lora_and_head(model)
bench.time_training(model, 4096, steps=1, warmup=1)
ids = torch.randint(0, 202048, (1, 4096), device="cuda")
from torch.profiler import ProfilerActivity, profile

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    loss.backward()
    torch.cuda.synchronize()
table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
(OUT / "profile.txt").write_text(table)
print(table[:6000])
(OUT / "perf_moe.json").write_text(json.dumps(res, indent=2, default=str))
print("\n| dq | skip recompute | dequant group | ms/layer | 3-layer peak GiB | dequant calls (1 layer) | projected 48-layer tok/s |")
for r in B:
    print(f"| {r['double_quant']} | {r['skip_recompute']} | {r['dequant_group']} | {r['ms_per_layer']:.1f} | "
          f"{r['peak_gib_3']:.1f} | {r['dequant_calls_1_layer']} | {r['projected_48_tokens_per_s']:,.0f} |")
for k, v in rows.items():
    if "ms" in k:
        print(k, v)
print("PERF_MOE", "OK" if ok else "FAILED")
