"""The NF4 routed-expert kernels one projection at a time, timed inside CUDA graphs (what decoding replays), on one
GPU. Run on the device machine: ``python scripts/device/decode_kernels.py OUT_DIR [--quick]`` (``--quick``: N = 1
and 20, fewer tiles).

For each Scout projection (gate_up 16 x 5120 x 16384, down 16 x 8192 x 5120; NF4, bf16 rows, random top-1 routing
with one expert left empty from N = 4) and N routed rows in 1 ... 64:

- ``gemv``: :func:`medtune.llama4.kernels.nf4_moe_matmul` (CUDA-core GEMV, ungated), default tiles and a sweep of
  (BM, BNB, BK, SPLIT_K, warps);
- ``dot``: :func:`medtune.llama4.kernels.nf4_moe_gemm` (tensor-core tiles dequantized in registers) with BM = 16
  rows per expert and a sweep of (BR, BC, warps);
- ``grouped``: every expert dequantized (``nf4_dequantize``) then ``torch._grouped_mm``, the path above the GEMV's
  row limit.

Each candidate is captured in a CUDA graph and replayed 20 times between two events (median of 5 such batches), so
the Python launch cost of Triton (~20 us) does not hide a kernel shorter than it; the figure is GPU time per call,
buffers included. Relative error ||a - ref|| / ||ref|| against dequantize + matmul in fp32 of the same bf16-rounded
weights. Bandwidth over the packed bytes + fp32 absmax of the experts the rows touch. Writes
OUT_DIR/decode_kernels.json and prints the best per (projection, N).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from medtune import llama4 as l4
from medtune.llama4 import dispatch, kernels

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/decode_kernels")
OUT.mkdir(parents=True, exist_ok=True)
QUICK = "--quick" in sys.argv
report: dict = {"gpu": torch.cuda.get_device_name(), "rows": []}


def save():
    (OUT / "decode_kernels.json").write_text(json.dumps(report, indent=2, default=str))


def graph_ms(fn, replays=20, batches=5) -> float:
    """GPU ms per call of ``fn`` replayed from a CUDA graph (``fn`` warmed up first on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            fn()
    times = []
    for _ in range(batches + 1):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / replays)
    del graph
    return statistics.median(times[1:])


def projection(experts, name):
    k, cols = experts.shapes[name]
    absmax = experts._absmax(name, 0, 16).view(16, -1).contiguous()
    return dict(packed=getattr(experts, f"{name}_packed"), absmax=absmax, k=k, cols=cols)


def routed(n: int, k: int, seed: int):
    gen = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    idx = torch.randint(0, 16, (n,), device="cuda", generator=gen)
    if n >= 4:
        idx[idx == 3] = 4  # expert 3 gets no rows
    idx, _ = idx.sort()
    return x, torch.bincount(idx, minlength=16)


def main():
    torch.manual_seed(0)
    experts = l4.Llama4NF4Experts(16, 5120, 8192, device="cuda")
    for name, (k, n) in experts.shapes.items():
        experts.quantize_(name, torch.empty(16, k, n, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02))
    code = dispatch.nf4_code(torch.device("cuda"))
    expert_bytes = {name: experts.shapes[name][0] * experts.shapes[name][1] * (0.5 + 4 / 64) for name in experts.shapes}
    ns = (1, 20) if QUICK else (1, 2, 4, 8, 16, 20, 32, 64)
    ws = {name: experts.dequantize_experts(name) for name in experts.shapes}  # (16, k, cols) bf16, the references
    for n in ns:  # rows outer: a time limit cuts the largest N, not a projection
        for name in ("gate_up", "down"):
            p = projection(experts, name)
            k, cols = p["k"], p["cols"]
            w = ws[name]
            x, counts = routed(n, k, seed=1000 + n)
            touched = int((counts > 0).sum())
            host = counts.tolist()
            ref, start = [], 0
            for e, c in enumerate(host):
                ref.append(x[start:start + c].float() @ w[e].float())
                start += c
            ref = torch.cat(ref)
            offs = torch.cumsum(counts, 0).to(torch.int32)
            cands = [("grouped", None, None, lambda: torch._grouped_mm(x, experts.dequantize_experts(name), offs=offs))]
            cands.append(("gemv", "default", None, lambda: kernels.nf4_moe_matmul(
                x, counts, p["packed"], p["absmax"], code, k=k, n_out=cols, gated=False)))
            cands.append(("gemv-unrounded", "default", None, lambda: kernels.nf4_moe_matmul(
                x, counts, p["packed"], p["absmax"], code, k=k, n_out=cols, gated=False, round_weights=False)))
            default = kernels.pick_blocks(k, cols, n)
            gemv_cfgs = set()
            if n == 1:  # the decode-at-batch-1 case: tile width, K step, K split and warps
                for bnb in (256, 512) if QUICK else (128, 256, 512):
                    for bk in (8, 16, 32):
                        steps = k // bk
                        for target in (default[3], default[3] * 2, default[3] * 4):
                            split = next(s for s in range(max(1, min(target, steps)), 0, -1) if steps % s == 0)
                            for warps in (4,) if QUICK else (4, 8):
                                gemv_cfgs.add(((1, bnb, bk, split), warps))
            else:  # rows per program and K step around the default
                for bm in (1, 2, 4):
                    for bk in (2, 4, 8):
                        steps = k // bk
                        split = next(s for s in range(max(1, min(default[3], steps)), 0, -1) if steps % s == 0)
                        gemv_cfgs.add(((bm, default[1], bk, split), 4))
            for blocks, warps in sorted(gemv_cfgs):
                cands.append(("gemv", blocks, warps, lambda b=blocks, wp=warps: kernels.nf4_moe_matmul(
                    x, counts, p["packed"], p["absmax"], code, k=k, n_out=cols, gated=False, blocks=b, num_warps=wp)))
            if n >= 4:
                for br in (32, 64) if QUICK else (32, 64, 128):
                    for bc in (128, 256) if QUICK else (64, 128, 256):
                        for warps in (4,) if QUICK else (4, 8):
                            def dot(b=(16, br, bc), wp=warps):
                                return kernels.nf4_moe_gemm(x, counts, p["packed"], p["absmax"], code, w_rows=k,
                                                            w_cols=cols, blocks=b, num_warps=wp)
                            cands.append(("dot", (16, br, bc), warps, dot))
            results = []
            for kind, blocks, warps, fn in cands:
                row = dict(projection=name, n=n, experts_touched=touched, kind=kind, blocks=blocks, warps=warps)
                try:
                    out = fn()
                    torch.cuda.synchronize()
                    row["rel_err"] = ((out.float()[:n] - ref).norm() / ref.norm()).item()
                    row["ms"] = graph_ms(fn)
                    row["gb_s"] = touched * expert_bytes[name] / (row["ms"] / 1e3) / 1e9
                except Exception as err:  # noqa: BLE001 - a config that does not build is a result too
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                results.append(row)
                report["rows"].append(row)
            ok = [r for r in results if "ms" in r and r["rel_err"] < 2e-2]
            best = {kind: min((r for r in ok if r["kind"] == kind), key=lambda r: r["ms"], default=None)
                    for kind in ("grouped", "gemv", "gemv-unrounded", "dot")}
            dflt = next((r for r in results if r["kind"] == "gemv" and r["blocks"] == "default"), None)
            print(f"{name} n={n} touched={touched}: default gemv {dflt.get('ms', dflt.get('error'))}; "
                  + "; ".join(f"{kind} {b['ms']:.4f} ms {b['gb_s']:.0f} GB/s {b['blocks']} w{b['warps']} "
                              f"err {b['rel_err']:.1e}" for kind, b in best.items() if b), flush=True)
            save()


if __name__ == "__main__":
    main()
