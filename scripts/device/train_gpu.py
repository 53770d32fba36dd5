"""Where a training step's time goes at the real rows' lengths, and what cuts it (device tool, one GPU).

``python scripts/device/train_gpu.py OUT [--lengths .carry/lengths.json] [--full 48]``

The lengths file holds the token counts of the training rows (``{"lengths": [...]}``: the shared medical-o1 rows in
the training template with the real Llama 4 tokenizer, written by ``python -m medtune.bench --write-lengths``).

1. The NF4 grouped GEMM (``kernels.nf4_moe_gemm``) at Scout's expert shapes and a median row's routing: error
   against dequantize + ``torch._grouped_mm`` (bf16), and time of both, with the memory-bandwidth floor.
2. Per decoder layer at a median-length row (2- and 6-layer Scout-shaped models), step ms of: the previous setup
   (LoRA fp32 under autocast, experts dequantized + grouped GEMM), LoRA in bf16 (what TRL's SFTTrainer makes of a
   4-bit model's adapters), + the NF4 GEMM, + no gradient checkpointing.
3. A torch.profiler trace of one step of the 2-layer model (current setup): ops by self CPU and GPU time.
4. The full-depth model: real rows one per step before/after, packed to 4,096 tokens, no checkpointing, and one
   4,096-token sequence (the README's headline), with peak GiB.
Writes ``train_gpu.json`` and the profiler tables under OUT; each part survives the failure of another.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medtune import llama4 as l4  # noqa: E402
from medtune.bench.models import add_lora_and_head, build_model, environment, free  # noqa: E402
from medtune.bench.training import (  # noqa: E402
    lora_bf16_,
    optimizer_step,
    pack_bfd,
    read_lengths,
    rows_batch,
    time_batches,
)
from medtune.llama4 import kernels  # noqa: E402

BW = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, datasheet HBM bandwidth
# The routed experts' path for the "after" setups, expert LoRA and the profile: "off" (dequantize + torch._grouped_mm,
# the default) or "auto" (the NF4 grouped GEMM; measured 6-23x slower on 2026-12-07, docs/bench-h200.md).
GEMM = "off"


def cuda_ms(fn, reps=20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_check(res, med):
    """NF4 GEMM vs dequantize + grouped GEMM on one Scout-shaped expert block."""
    from medtune.llama4 import synthetic

    config = l4.scout_text_config(num_hidden_layers=1)
    gen = torch.Generator("cuda").manual_seed(0)
    layer = synthetic.random_decoder_layer(config, 0, device="cuda", generator=gen, double_quant=False,
                                           nf4_experts=True)
    ex = layer.feed_forward.experts
    bw = next((v for k, v in BW.items() if k in torch.cuda.get_device_name()), 4.8e12)
    out = {}
    for rows in (med, 4096):
        counts = torch.distributions.Multinomial(rows, torch.ones(16)).sample().to("cuda", torch.int64)
        offs = counts.cumsum(0, dtype=torch.int32)
        for name, (k, n) in ex.shapes.items():
            for transpose in (False, True):
                a = torch.randn(rows, n if transpose else k, device="cuda", dtype=torch.bfloat16, generator=gen)

                def ref():
                    w = ex.dequantize_experts(name)
                    return torch._grouped_mm(a, w.transpose(-2, -1) if transpose else w, offs=offs)

                new = ex.gemm(name, a, counts, transpose=transpose)
                r = ref()
                err = ((new.float() - r.float()).norm() / r.float().norm()).item()
                t_ref, t_new = cuda_ms(ref), cuda_ms(lambda: ex.gemm(name, a, counts, transpose=transpose))
                nbytes = k * n * 16 * (0.5 + 4 / 64) + a.numel() * 2 * 2
                key = f"{name}{'^T' if transpose else ''}@{rows}"
                out[key] = dict(rel_err=err, dequant_grouped_ms=t_ref, nf4_gemm_ms=t_new,
                                floor_ms=nbytes / bw * 1e3, tflops=2 * rows * k * n / t_new / 1e9)
                print(key, out[key], flush=True)
    res["kernel"] = out


def variant(n_layers, name):
    model = add_lora_and_head(build_model(n_layers, "medtune")[0])
    if name != "before":
        lora_bf16_(model)
    if "nockpt" in name:
        model.base_model.model.gradient_checkpointing_disable()
    return model


VARIANTS = {"before": "off", "bf16lora": "off", "bf16lora_gemm": "auto", "bf16lora_gemm_nockpt": "auto"}


def small(res, med, gen):
    per = {}
    for name, fused in VARIANTS.items():
        l4.Llama4NF4Experts.fused_gemm = fused
        r = {}
        for n in (2, 6):
            model = variant(n, name)
            r[n] = time_batches(model, [rows_batch([med], gen)] * 4)
            del model
            free()
        per[name] = dict(ms_per_layer=(r[6]["step_ms"] - r[2]["step_ms"]) / 4, runs=r)
        print(name, json.dumps(per[name]), flush=True)
    res["per_layer_median_row"] = per


def profile(res, med, gen, out):
    from torch.profiler import ProfilerActivity, profile

    l4.Llama4NF4Experts.fused_gemm = GEMM
    model = variant(2, "bf16lora")
    b = rows_batch([med], gen)
    time_batches(model, [b])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer_step(model, b, opt)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    (out / "profile_cpu.txt").write_text(ka.table(sort_by="self_cpu_time_total", row_limit=40))
    (out / "profile_gpu.txt").write_text(ka.table(sort_by="self_device_time_total", row_limit=40))
    res["profile_2_layers"] = dict(wall_ms=wall * 1e3, gpu_kernel_ms=sum(e.self_device_time_total for e in ka) / 1e3,
                                   cpu_ops=sum(e.count for e in ka))
    print("profile", res["profile_2_layers"], flush=True)
    del model, opt, prof
    free()


def full(res, lengths, gen, n_layers, n_rows, save):
    rnd = random.Random(0)
    rows = rnd.sample(lengths, n_rows - 1) + [max(lengths)]
    packs = pack_bfd(rnd.sample(lengths, 60), 4096)[:4]
    out = res.setdefault("full", {})
    t0 = time.perf_counter()
    model = add_lora_and_head(build_model(n_layers, "medtune")[0])
    res["full_build_s"] = time.perf_counter() - t0
    l4.Llama4NF4Experts.fused_gemm = "off"
    out["before_batch1"] = time_batches(model, [rows_batch([n], gen) for n in rows])
    print("full", out, flush=True)
    lora_bf16_(model)
    out["bf16lora_dequant_batch1"] = time_batches(model, [rows_batch([n], gen) for n in rows])
    l4.Llama4NF4Experts.fused_gemm = GEMM
    if GEMM != "off":
        out["after_batch1"] = time_batches(model, [rows_batch([n], gen) for n in rows])
    else:
        out["after_batch1"] = out["bf16lora_dequant_batch1"]
    print("full", out, flush=True)
    out["after_packed4096"] = dict(rows_per_pack=[len(p) for p in packs],
                                   **time_batches(model, [rows_batch(p, gen) for p in packs]))
    out["after_one4096"] = time_batches(model, [rows_batch([4096], gen)] * 2)
    print("full", out, flush=True)
    save()
    model.base_model.model.gradient_checkpointing_disable()
    try:
        out["after_batch1_nockpt"] = time_batches(model, [rows_batch([n], gen) for n in rows])
        print("full", out, flush=True)
        out["after_packed4096_nockpt"] = time_batches(model, [rows_batch(p, gen) for p in packs])
    except torch.OutOfMemoryError as err:
        out["nockpt_error"] = str(err)[:300]
    print("full", out, flush=True)
    save()
    # log-likelihood scoring's forward (no grad, 32 items of 300 tokens as 04/06 batch them): GEMM vs dequantize
    model.eval()
    ids = torch.randint(0, 202048, (32, 300), device="cuda", generator=gen)
    for mode in ("off", "auto"):
        l4.Llama4NF4Experts.fused_gemm = mode
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            ms = cuda_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), reps=3)
        out[f"scoring_b32x300_{mode}"] = dict(ms=ms, items_per_s=32 / ms * 1e3)
        print("scoring", mode, out[f"scoring_b32x300_{mode}"], flush=True)


def expert_lora(res, lengths, gen, n_layers, n_rows):
    """The full model with LoRA r=16 on every routed expert's gate_up/down as well (sparse, on the NF4 weights)."""
    rows = random.Random(0).sample(lengths, n_rows - 1) + [max(lengths)]
    l4.Llama4NF4Experts.fused_gemm = GEMM
    model = lora_bf16_(add_lora_and_head(build_model(n_layers, "medtune")[0], expert_r=16))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = dict(trainable_params=trainable, batch1=time_batches(model, [rows_batch([n], gen) for n in rows]))
    res["expert_lora_r16"] = out
    print("expert lora", out, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--lengths", type=Path, default=Path(".carry/lengths.json"))
    ap.add_argument("--full", type=int, default=48)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--parts", nargs="+", default=["kernel", "full", "expert_lora", "profile", "small"])
    ap.add_argument("--gemm", choices=["off", "auto"], default="off")
    args = ap.parse_args()
    global GEMM
    GEMM = args.gemm
    args.out.mkdir(parents=True, exist_ok=True)
    lengths = read_lengths(args.lengths)
    med = int(statistics.median(lengths))
    res: dict = dict(environment=environment(), median_row=med, rows=len(lengths))
    gen = torch.Generator("cuda").manual_seed(0)

    def save():
        (args.out / "train_gpu.json").write_text(json.dumps(res, indent=2, default=str))

    steps = {"kernel": lambda: kernel_check(res, med), "small": lambda: small(res, med, gen),
             "profile": lambda: profile(res, med, gen, args.out),
             "full": lambda: full(res, lengths, gen, args.full, args.rows, save),
             "expert_lora": lambda: expert_lora(res, lengths, gen, args.full, 6)}
    for part in args.parts:
        t0 = time.perf_counter()
        try:
            steps[part]()
        except Exception:  # noqa: BLE001 - report and go on with the next part
            traceback.print_exc()
            res.setdefault("errors", {})[part] = traceback.format_exc()[-2000:]
        res.setdefault("part_s", {})[part] = time.perf_counter() - t0
        free()
        save()
    print("kernel failures:", kernels.failed(), flush=True)


if __name__ == "__main__":
    main()
