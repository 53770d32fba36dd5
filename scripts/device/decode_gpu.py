"""The decode path on one GPU: the fused NF4 expert kernel's numerics and speed, and greedy equality on a 2-layer
Scout-shaped model. Run on the device machine: ``python scripts/device/decode_gpu.py OUT_DIR [--sweep]``.

1. One Scout-shaped layer of NF4 routed experts (16 x 5120 x 16384 gate_up, 16 x 8192 x 5120 down), bf16, fresh
   random weights and inputs per size: the fused kernel (:meth:`Llama4NF4Experts.fused_forward`) against the
   dequantize + ``torch._grouped_mm`` path (``_NF4ExpertsFunction``, what ran before) for N routed rows
   (1 ... 1,024, random top-1 routing, an empty expert included): relative error ||a - b|| / ||b||, every output
   row written (output poisoned with NaN first), time per call (CUDA events, median), and the fused kernel's
   effective bandwidth over the bytes of the experts it had to read.
2. ``--sweep``: tile sizes (BN, BK, warps, stages) at N = 1 and 32, to pick the defaults.
3. A 2-layer Scout-shaped ``Llama4ForCausalLM`` (bf16, NF4 Linears and experts): 64 greedy tokens at batch 2 from
   ``greedy_decode`` (static cache, CUDA graph, fused kernel) against ``model.generate`` with the fused kernel off
   (the dequantize path); the first divergence, if any, with the reference's top-2 logit margin there.
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
    for n in (1, 2, 8, 32):
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
    """Tile sizes of the fused kernel at N = 1 and 32 rows: gate_up and down projection ms for each
    (BNB, BK, SPLIT_K, warps); the best per N is printed."""
    out = []
    code = l4._nf4_code(torch.device("cuda"))
    gu_abs = experts._absmax("gate_up", 0, 16).view(16, -1)
    d_abs = experts._absmax("down", 0, 16).view(16, -1)
    for n in (1, 32):
        x, counts = routed(n, seed=100 + n)
        h = torch.randn(n, 8192, device="cuda", dtype=torch.bfloat16)
        bm = 16 if n <= 16 else 32
        for bnb in (32, 64, 128):
            for bk in (32, 64, 128):
                for split in (1, 8, 16):
                    for warps in (4,):
                        blocks = (bm, bnb, bk, split)
                        try:
                            t1 = timed(lambda: kernels.nf4_moe_matmul(
                                x, counts, experts.gate_up_packed, gu_abs, code, k=5120, n_out=8192, gated=True,
                                blocks=blocks, num_warps=warps), reps=20)
                            t2 = timed(lambda: kernels.nf4_moe_matmul(
                                h, counts, experts.down_packed, d_abs, code, k=8192, n_out=5120, gated=False,
                                blocks=blocks, num_warps=warps), reps=20)
                        except Exception as err:  # noqa: BLE001 - a config that does not compile is a result too
                            out.append(dict(n=n, blocks=blocks, warps=warps, error=str(err)[:200]))
                            continue
                        out.append(dict(n=n, blocks=blocks, warps=warps, gate_up_ms=t1, down_ms=t2,
                                        total_ms=t1 + t2))
        ok = [r for r in out if r.get("n") == n and "total_ms" in r]
        for r in sorted(ok, key=lambda r: r["total_ms"])[:5]:
            print("best", r, flush=True)
        print("default", kernels.pick_blocks(5120, 16384, n), kernels.pick_blocks(8192, 5120, n), flush=True)
    report["sweep"] = out
    save()


def greedy_equality():
    from medtune.bench.models import build_model

    model, _ = build_model(2, "medtune")
    model.eval()
    gen = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(1000, 200000, (2, 40), device="cuda", generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    new = decode.greedy_decode(model, ids, mask, max_new_tokens=64, eos_token_ids=[-1], pad_token_id=0)
    l4.Llama4NF4Experts.fused = "off"
    try:
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    finally:
        l4.Llama4NF4Experts.fused = "auto"
    ref_tokens = ref.sequences[:, ids.shape[1]:]
    res = dict(equal=bool(torch.equal(new, ref_tokens)), rows=[])
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
    experts = scout_experts(0)
    kernel_checks(experts)
    greedy_equality()
    if "--sweep" in sys.argv:
        sweep(experts)
