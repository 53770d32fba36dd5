"""The decode path on one GPU: the fused NF4 expert kernel's numerics and speed, and greedy equality on a 2-layer
Scout-shaped model. Run on the device machine: ``python scripts/device/decode_gpu.py OUT_DIR [--sweep]``.

1. One Scout-shaped layer of NF4 routed experts (16 x 5120 x 16384 gate_up, 16 x 8192 x 5120 down), bf16, fresh
   random weights and inputs per size: the fused kernel (:meth:`Llama4NF4Experts.fused_forward`) against the
   dequantize + ``torch._grouped_mm`` path (``_NF4ExpertsFunction``, what ran before) for N routed rows
   (1 ... 1,024, random top-1 routing, an empty expert included): relative error ||a - b|| / ||b||, every output
   row written (output poisoned with NaN first), time per call (CUDA events, median), and the fused kernel's
   effective bandwidth over the bytes of the experts it had to read.
2. ``--sweep``: tile sizes (BM, BNB, BK, SPLIT_K, warps) per projection at N = 1, 8 and 32, to pick the defaults.
3. A 2-layer Scout-shaped ``Llama4ForCausalLM`` (bf16, NF4 Linears and experts): 64 greedy tokens at batch 2 from
   ``greedy_decode`` (static cache, CUDA graph, fused kernel) against ``model.generate`` with the fused kernel off
   (the dequantize path); the first divergence, if any, with the reference's top-2 logit margin there.
   ``--greedy-only`` runs this step alone.
4. ``--profile``: CUDA kernel times of eager decode steps on a 4-layer model at batch 1 (OUT_DIR/profile.txt).
Writes OUT_DIR/decode_gpu.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from medtune import llama4 as l4
from medtune.llama4 import decode, kernels

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/decode_gpu")
OUT.mkdir(parents=True, exist_ok=True)
report: dict = {}


def save():
    (OUT / "decode_gpu.json").write_text(json.dumps(report, indent=2, default=str))


def timed(fn, reps=50, warm=5):
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


def scout_experts(seed: int) -> l4.Llama4NF4Experts:
    torch.manual_seed(seed)
    experts = l4.Llama4NF4Experts(16, 5120, 8192, device="cuda")
    for name, (k, n) in experts.shapes.items():
        w = torch.empty(16, k, n, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02)
        experts.quantize_(name, w)
        del w
    return experts


def routed(n: int, seed: int):
    gen = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(n, 5120, device="cuda", dtype=torch.bfloat16, generator=gen)
    idx = torch.randint(0, 16, (n,), device="cuda", generator=gen)
    if n >= 4:
        idx[idx == 3] = 4  # expert 3 gets no rows
    idx, _ = idx.sort()
    counts = torch.bincount(idx, minlength=16)
    return x, counts


def kernel_checks(experts):
    """Fused kernel vs the sync-free grouped path (all experts dequantized + grouped GEMM) vs the training path
    (per-expert dequantize, host-read counts) at N routed rows; writes OUT/fused_max_rows: the largest N up to
    which the fused kernel is faster than the grouped path at every N measured (0: never)."""
    rows = []
    expert_bytes = sum(b.numel() * b.element_size() for b in experts.buffers()) / 16
    for n in (1, 2, 4, 8, 16, 32, 64):
        x, counts = routed(n, seed=n)
        with torch.no_grad():
            ref = l4._NF4ExpertsFunction.apply(x, experts, counts, True)
            out = experts.fused_forward(x, counts)
            grouped = experts.grouped_forward(x, counts)
            t_fused = timed(lambda: experts.fused_forward(x, counts))
            t_grouped = timed(lambda: experts.grouped_forward(x, counts))
            t_ref = timed(lambda: l4._NF4ExpertsFunction.apply(x, experts, counts, True), reps=20)
        touched = int((counts > 0).sum())
        rel = lambda a: ((a.float() - ref.float()).norm() / ref.float().norm()).item()  # noqa: E731
        row = dict(n=n, experts_touched=touched, fused_rel_err=rel(out), grouped_rel_err=rel(grouped),
                   all_written=bool(torch.isfinite(out).all()), fused_ms=t_fused, grouped_ms=t_grouped,
                   per_expert_ms=t_ref, fused_gb_s=touched * expert_bytes / (t_fused / 1e3) / 1e9)
        rows.append(row)
        print(row, flush=True)
    best = 0
    for r in rows:
        if r["fused_ms"] >= r["grouped_ms"]:
            break
        best = r["n"]
    (OUT / "fused_max_rows").write_text(str(best))
    print("fused_max_rows", best, flush=True)
    report["kernel"] = rows
    report["fused_max_rows"] = best
    save()


def sweep(experts):
    """Tile sizes of the fused kernel, per projection, in three stages: at N = 1 row (BNB, BK, warps) with the
    default SPLIT_K, then SPLIT_K around the default with the best of those (and unrounded weights once); at N = 8
    and 32 rows (BM, BK) with the best BNB and warps of N = 1. The best per stage is printed."""
    out = []
    code = l4._nf4_code(torch.device("cuda"))
    projections = {
        "gate_up": dict(packed=experts.gate_up_packed, absmax=experts._absmax("gate_up", 0, 16).view(16, -1), k=5120,
                        n_out=8192, gated=True, cols=16384),
        "down": dict(packed=experts.down_packed, absmax=experts._absmax("down", 0, 16).view(16, -1), k=8192,
                     n_out=5120, gated=False, cols=5120),
    }

    def run(name, n, blocks, warps, rounded=True):
        p = projections[name]
        x, counts = routed(n, seed=100 + n)
        if name == "down":
            x = torch.randn(n, 8192, device="cuda", dtype=torch.bfloat16)
        row = dict(projection=name, n=n, blocks=blocks, warps=warps, rounded=rounded)
        try:
            row["ms"] = timed(lambda: kernels.nf4_moe_matmul(
                x, counts, p["packed"], p["absmax"], code, k=p["k"], n_out=p["n_out"], gated=p["gated"],
                blocks=blocks, num_warps=warps, round_weights=rounded), reps=20)
            touched = int((counts > 0).sum())
            row["gb_s"] = touched * p["packed"][0].numel() * 1.125 / (row["ms"] / 1e3) / 1e9  # + fp32 absmax
        except Exception as err:  # noqa: BLE001 - a config that does not compile is a result too
            row["error"] = str(err)[:200]
        out.append(row)
        return row

    def best(rows):
        ok = [r for r in rows if "ms" in r]
        return min(ok, key=lambda r: r["ms"]) if ok else None

    def splits(k, bk, around):
        steps = k // bk
        return sorted({s for s in (around // 4, around // 2, around, around * 2, around * 4)
                       if s >= 1 and steps % s == 0})

    for name, p in projections.items():
        k, cols = p["k"], p["cols"]
        default = kernels.pick_blocks(k, cols, 1)
        stage = []
        for bnb in (128, 256, 512):
            for bk in (4, 8, 16):
                split = next(s for s in range(default[3], 0, -1) if (k // bk) % s == 0)
                for warps in (4, 8):
                    stage.append(run(name, 1, (1, bnb, bk, split), warps))
        b1 = best(stage)
        print("best n=1", name, b1, "default", default, flush=True)
        if b1 is None:
            continue
        _, bnb, bk, split = b1["blocks"]
        stage = [run(name, 1, (1, bnb, bk, s), b1["warps"]) for s in splits(k, bk, split)]
        b2 = best(stage + [b1])
        run(name, 1, b2["blocks"], b2["warps"], rounded=False)
        print("best n=1 split", name, b2, flush=True)
        for n in (8, 32):
            stage = []
            for bm in (1, 2, 4):
                for bk2 in (1, 2, 4):
                    s = next(s for s in range(b2["blocks"][3], 0, -1) if (k // bk2) % s == 0)
                    stage.append(run(name, n, (bm, bnb, bk2, s), b2["warps"]))
            print(f"best n={n}", name, best(stage), "default", kernels.pick_blocks(k, cols, n), flush=True)
        report["sweep"] = out
        save()


def profile_step():
    """CUDA kernel time of eager decode steps (no graph) on a 4-layer Scout-shaped model at batch 1: what one
    layer's step spends its GPU time on. Writes OUT/profile.txt (top kernels by total CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    from medtune.bench.models import build_model

    model, _ = build_model(4, "medtune")
    model.eval()
    ids = torch.randint(1000, 200000, (1, 64), device="cuda")
    mask = torch.ones_like(ids)
    decode.greedy_decode(model, ids, mask, max_new_tokens=4, eos_token_ids=[-1], pad_token_id=0, cuda_graph=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode.greedy_decode(model, ids, mask, max_new_tokens=17, eos_token_ids=[-1], pad_token_id=0,
                             cuda_graph=False)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
    (OUT / "profile.txt").write_text("4 layers, batch 1, 64-token prompt, 17 new tokens (1 prefill + 16 decode "
                                     "steps), eager\n" + table)
    print(table[:6000], flush=True)
    del model
    torch.cuda.empty_cache()


def greedy_equality():
    from medtune.bench.models import build_model

    model, _ = build_model(2, "medtune")
    model.eval()
    gen = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(1000, 200000, (2, 40), device="cuda", generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    from torch._dynamo.utils import counters

    new = decode.greedy_decode(model, ids, mask, max_new_tokens=64, eos_token_ids=[-1], pad_token_id=0)
    comp = decode.greedy_decode(model, ids, mask, max_new_tokens=64, eos_token_ids=[-1], pad_token_id=0,
                                compile=True)
    compiled = dict(compile_failed=decode.compile_failed(), graph_breaks=sum(counters["graph_break"].values()),
                    break_reasons=[k[:300] for k in counters["graph_break"]][:5],
                    equal_to_uncompiled=bool(torch.equal(new, comp)),
                    first_difference=[int((new[b] != comp[b]).nonzero()[0]) if (new[b] != comp[b]).any() else None
                                      for b in range(2)])
    print("compiled step", compiled, flush=True)
    l4.Llama4NF4Experts.fused = "off"
    try:
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    finally:
        l4.Llama4NF4Experts.fused = "auto"
    ref_tokens = ref.sequences[:, ids.shape[1]:]
    res = dict(equal=bool(torch.equal(new, ref_tokens)), rows=[], compiled_step=compiled)
    for b in range(2):
        diff = (new[b] != ref_tokens[b]).nonzero()
        if diff.numel():
            t = int(diff[0])
            top2 = ref.logits[t][b].float().topk(2).values
            res["rows"].append(dict(row=b, first_divergence=t, ref_top2_margin=float(top2[0] - top2[1])))
        else:
            res["rows"].append(dict(row=b, first_divergence=None))
    report["greedy_2layer"] = res
    print("greedy", res, flush=True)
    save()


if __name__ == "__main__":
    report["gpu"] = torch.cuda.get_device_name()
    report["versions"] = dict(torch=torch.__version__)
    if "--greedy-only" in sys.argv:  # the compiled-step equality alone (no kernel table)
        greedy_equality()
        sys.exit(0)
    experts = scout_experts(0)
    kernel_checks(experts)  # writes OUT/fused_max_rows
    greedy_equality()
    if "--profile" in sys.argv:
        profile_step()
    if "--sweep" in sys.argv:  # last: a time limit cuts only the sweeps
        sweep(experts)
