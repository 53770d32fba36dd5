"""Where a training step's time goes at the real rows' lengths, and what cuts it (device tool, one GPU).

``python scripts/device/train_gpu.py OUT [--lengths .carry/lengths.json] [--full 48]``

The lengths file holds the token counts of the training rows (``{"lengths": [...]}``: the shared medical-o1 rows in
the training template with the real Llama 4 tokenizer, made by ``python -m medtune.bench --write-lengths``). Steps:

1. Per decoder layer at a median-length row (2- and 6-layer Scout-shaped models): step ms for LoRA in fp32 under
   autocast (what the benchmark ran), LoRA in bf16 (what TRL's SFTTrainer makes of a 4-bit model's adapters), and
   bf16 without gradient checkpointing.
2. A torch.profiler trace of one step of the 2-layer model: ops by self CPU time and by GPU time, GPU busy share.
3. Host syncs inside one step (``torch.cuda.set_sync_debug_mode``), with the Python line that caused each.
4. The full-depth model: real rows one per step (checkpointing on and off), rows packed to 4,096 tokens, and one
   4,096-token sequence (the README's headline), with peak GiB.
Writes ``train_gpu.json`` and the profiler tables under OUT.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medtune.bench.models import GIB, add_lora_and_head, build_model, environment, free  # noqa: E402


def batch_of(lengths: list[int], gen: torch.Generator) -> dict:
    """Rows of ``lengths`` tokens as one padding-free sequence (TRL's collator: positions restart per row, the
    first label of each row ignored, no attention mask); one row is a plain sequence."""
    ids = torch.randint(0, 202048, (1, sum(lengths)), device="cuda", generator=gen)
    if len(lengths) == 1:
        return dict(input_ids=ids, labels=ids.clone(), use_cache=False)
    pos = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    labels = ids.clone()
    labels[pos == 0] = -100
    return dict(input_ids=ids, labels=labels, position_ids=pos, use_cache=False)  # SFTTrainer.compute_loss's


def set_variant(model, variant: str):
    if "bf16" in variant:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if "nockpt" in variant:
        model.base_model.model.gradient_checkpointing_disable()
    return model


def run_steps(model, batches: list[dict], warmup: int = 1) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times, tokens = [], []
    for i, b in enumerate([batches[0]] * warmup + batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**b, fused_lm_head=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(b["input_ids"].shape[1])
    loss = loss.detach()
    del opt
    return dict(steps=len(times), step_ms_median=statistics.median(times) * 1e3,
                tokens_per_s=sum(tokens) / sum(times), mean_tokens=sum(tokens) / len(tokens),
                peak_gib=torch.cuda.max_memory_allocated() / GIB, loss_last=float(loss))


def pack(lengths: list[int], limit: int) -> list[list[int]]:
    """Best-fit decreasing, as TRL's ``packing_strategy="bfd"``."""
    bins: list[list[int]] = []
    for n in sorted(lengths, reverse=True):
        best = min((b for b in bins if sum(b) + n <= limit), key=lambda b: limit - sum(b) - n, default=None)
        if best is None:
            bins.append([n])
        else:
            best.append(n)
    return bins


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--lengths", type=Path, default=Path(".carry/lengths.json"))
    ap.add_argument("--full", type=int, default=48)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--skip-small", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lengths = json.loads(args.lengths.read_text())["lengths"]
    med = int(statistics.median(lengths))
    res: dict = dict(environment=environment(), median_row=med, rows=len(lengths))
    gen = torch.Generator("cuda").manual_seed(0)
    save = lambda: (args.out / "train_gpu.json").write_text(json.dumps(res, indent=2))  # noqa: E731

    if not args.skip_small:
        try:
            small(args, res, med, gen, save)
        except Exception:  # noqa: BLE001 - report and go on to the full model
            traceback.print_exc()
    if args.full:
        try:
            full_model(args, res, lengths, gen, save)
        except Exception:  # noqa: BLE001
            traceback.print_exc()


def small(args, res, med, gen, save) -> None:
    per = {}
    for variant in ("fp32lora", "bf16lora", "bf16lora_nockpt"):
        r = {}
        for n in (2, 6):
            model = set_variant(add_lora_and_head(build_model(n, "medtune")[0]), variant)
            r[n] = run_steps(model, [batch_of([med], gen)] * 4)
            del model
            free()
        per[variant] = dict(ms_per_layer=(r[6]["step_ms_median"] - r[2]["step_ms_median"]) / 4, runs=r)
        print(variant, json.dumps(per[variant]), flush=True)
    res["per_layer_median_row"] = per
    save()

    model = set_variant(add_lora_and_head(build_model(2, "medtune")[0]), "bf16lora")
    b = batch_of([med], gen)
    run_steps(model, [b])
    from torch.profiler import ProfilerActivity, profile
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**b, fused_lm_head=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    (args.out / "profile_cpu.txt").write_text(ka.table(sort_by="self_cpu_time_total", row_limit=45))
    (args.out / "profile_gpu.txt").write_text(ka.table(sort_by="self_device_time_total", row_limit=45))
    gpu_us = sum(e.self_device_time_total for e in ka)
    res["profile_2_layers"] = dict(wall_ms=wall * 1e3, gpu_kernel_ms=gpu_us / 1e3,
                                   cpu_ops=sum(e.count for e in ka))
    print("profile", res["profile_2_layers"], flush=True)

    syncs: dict[str, int] = {}

    def hook(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-4:])
        key = f"{str(message)[:60]} @ {where}"
        syncs[key] = syncs.get(key, 0) + 1

    old = warnings.showwarning
    warnings.showwarning = hook
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**b, fused_lm_head=True).loss
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
    res["host_syncs_one_step"] = syncs
    print("syncs", json.dumps(syncs, indent=1), flush=True)
    del model, opt, prof
    free()
    save()

def full_model(args, res, lengths, gen, save) -> None:
    t0 = time.perf_counter()
    model = set_variant(add_lora_and_head(build_model(args.full, "medtune")[0]), "bf16lora")
    res["full_build_s"] = time.perf_counter() - t0
    rnd = random.Random(0)
    rows = rnd.sample(lengths, args.rows - 1) + [max(lengths)]
    full = {}
    full["real_rows_batch1_ckpt"] = run_steps(model, [batch_of([n], gen) for n in rows])
    print("full", full, flush=True)
    bins = pack(rnd.sample(lengths, 60), 4096)[:4]
    full["packed_4096_ckpt"] = dict(rows_per_pack=[len(b) for b in bins],
                                    **run_steps(model, [batch_of(b, gen) for b in bins]))
    print("full", full, flush=True)
    full["one_4096_ckpt"] = run_steps(model, [batch_of([4096], gen)] * 2)
    print("full", full, flush=True)
    res["full"] = full
    save()
    model.base_model.model.gradient_checkpointing_disable()
    try:
        full["real_rows_batch1_nockpt"] = run_steps(model, [batch_of([n], gen) for n in rows])
        print("full", full, flush=True)
        full["packed_4096_nockpt"] = run_steps(model, [batch_of(b, gen) for b in bins])
    except torch.OutOfMemoryError as err:
        full["nockpt_error"] = str(err)[:300]
    print("full", full, flush=True)
    save()


if __name__ == "__main__":
    main()
