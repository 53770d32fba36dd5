"""Scout-shaped generation and log-likelihood benchmark on one GPU: medtune's decode path vs ``model.generate``.

``python -m medtune.bench --generate`` (see :func:`run`). The model is ``models.build_model(layers,
"medtune")``: Scout's text config, random weights, bitsandbytes NF4 Linears, NF4 routed experts, sparse top-1
dispatch, bf16 LM head. Measured in one run:

- **decode**, greedy, a ``--prompt``-token prompt: tokens/s in total over the batch (new tokens after the first
  over decode time; prefill timed apart) for
  ``medtune``: :func:`medtune.llama4.decode.greedy_decode` (static cache, CUDA graph per step, fused NF4 expert
  kernel), and ``generate``: transformers' ``model.generate`` with the experts' dequantize path (what 04/06 ran
  before), timed over fewer new tokens (``--baseline-new``; its rate does not depend on the count);
  then ``medtune`` again with a LoRA adapter (r=64 on the walkthrough's seven projections, unmerged, as 06 runs).
- **the physical limit** for each batch: bytes a decode step must read (every NF4 Linear, the routed experts the
  batch is expected to touch, the bf16 LM head, the KV cache at mid-answer) over the copy bandwidth measured in
  the same run (a 4 GiB device-to-device copy, bytes read + written).
- **log-likelihood** scoring: items/s of a no-grad forward of ``--ll-tokens``-token items, ``logits_to_keep=1``,
  at several batch sizes, and the batch size :func:`medtune.evaluation.batching.auto_batch_size` picks.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from medtune import llama4 as l4
from medtune.bench.models import LORA_TARGETS, build_model, environment
from medtune.evaluation.batching import auto_batch_size
from medtune.llama4 import decode

GIB = 2**30


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 10 copies of 4 GiB."""
    src = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * GIB / statistics.median(times)


def step_bytes(model, batch: int, context: int) -> dict:
    """Bytes one decode step must read from GPU memory at ``batch`` sequences and ``context`` cached positions.

    NF4 Linears: packed bytes + absmax (all of them, every step); routed experts: the expected number of distinct
    experts that ``batch`` tokens pick per layer under uniform top-1 routing, E (1 - (1 - 1/E)^batch), times one
    expert's packed bytes + absmax; the bf16 LM head; the KV cache (:func:`medtune.llama4.decode.kv_cache_bytes`).
    """
    import bitsandbytes as bnb

    linear = expert = lm_head = 0
    experts_per_layer = None
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            linear += m.weight.numel() * m.weight.element_size() + m.weight.quant_state.absmax.numel() * 4
        elif isinstance(m, l4.Llama4NF4Experts):  # one expert of one layer (all layers alike)
            experts_per_layer = m.num_experts
            expert = sum(b.numel() * b.element_size() for b in m.buffers()) / m.num_experts
    lm_head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    moe_layers = sum(isinstance(m, l4.Llama4NF4Experts) for m in model.modules())
    touched = experts_per_layer * (1 - (1 - 1 / experts_per_layer) ** batch) if experts_per_layer else 0
    kv = decode.kv_cache_bytes(model, batch * context)
    total = linear + expert * touched * moe_layers + lm_head + kv
    return dict(nf4_linears=linear, routed_experts=expert * touched * moe_layers, experts_touched=touched,
                lm_head=lm_head, kv_cache=kv, total=total)


def _prompts(batch: int, prompt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator("cuda").manual_seed(seed)
    ids = torch.randint(1000, 200000, (batch, prompt), device="cuda", generator=gen)
    return ids, torch.ones_like(ids)


def time_medtune(model, batch: int, prompt: int, new: int, *, compile: bool = False) -> dict:
    """Greedy decode with :func:`decode.greedy_decode` (``compile``: its step through ``torch.compile``); EOS never
    matches (random weights), so every sequence runs ``new`` tokens. The first call (same shapes: it builds the
    compiled step, then decodes) is timed as ``first_call_s``; then prefill and decode are timed apart (CUDA sync
    around each)."""
    from torch._dynamo.utils import counters

    ids, mask = _prompts(batch, prompt, seed=batch)
    kw = dict(eos_token_ids=[-1], pad_token_id=0, compile=compile)
    breaks = sum(counters["graph_break"].values())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    decode.greedy_decode(model, ids, mask, max_new_tokens=new, check_every=new, **kw)  # builds, then decodes
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    decode.greedy_decode(model, ids, mask, max_new_tokens=1, **kw)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode.greedy_decode(model, ids, mask, max_new_tokens=new, check_every=new, **kw)
    torch.cuda.synchronize()
    total_s = time.perf_counter() - t0
    decode_s = max(total_s - prefill_s, 1e-9)
    return dict(path="medtune, step compiled (torch.compile)" if compile else "medtune", batch=batch, prompt=prompt,
                new=new, prefill_s=prefill_s, total_s=total_s, first_call_s=first_s,
                tokens_per_s=batch * (new - 1) / decode_s, ms_per_step=decode_s / (new - 1) * 1e3,
                peak_gib=torch.cuda.max_memory_allocated() / GIB, compiled=compile and decode.compile_failed() is None,
                graph_breaks=sum(counters["graph_break"].values()) - breaks)


def time_generate(model, batch: int, prompt: int, new: int) -> dict:
    """transformers' ``generate`` (greedy, dynamic cache) with the experts' dequantize path, the path 04/06 ran."""
    ids, mask = _prompts(batch, prompt, seed=batch)
    fused = l4.Llama4NF4Experts.fused
    l4.Llama4NF4Experts.fused = "off"
    try:
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        torch.cuda.synchronize()
        total_s = time.perf_counter() - t0
    finally:
        l4.Llama4NF4Experts.fused = fused
    decode_s = max(total_s - prefill_s, 1e-9)
    return dict(path="generate", batch=batch, prompt=prompt, new=new, prefill_s=prefill_s, total_s=total_s,
                tokens_per_s=batch * (new - 1) / decode_s, ms_per_step=decode_s / (new - 1) * 1e3,
                peak_gib=torch.cuda.max_memory_allocated() / GIB)


def time_loglik(model, batch: int, tokens: int, reps: int = 3) -> dict:
    """Items/s of a no-grad forward over ``batch`` items of ``tokens`` tokens with ``logits_to_keep=1``."""
    ids, mask = _prompts(batch, tokens, seed=7)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return dict(batch=batch, tokens=tokens, s=s, items_per_s=batch / s,
                peak_gib=torch.cuda.max_memory_allocated() / GIB)


def add_lora(model):
    """LoRA r=64/alpha=16 on the seven projections, as 05 trains it; PEFT keeps it unmerged (06's setting)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():  # a trained adapter has B != 0: make the LoRA path do real work
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model.eval()


def to_markdown(res: dict) -> str:
    env = res["environment"]
    bw = res["copy_bandwidth"] / 1e12
    lines = [f"# Scout-shaped generation benchmark, one {env['gpu']}", "",
             f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}, triton {env.get('triton')}. {res['layers']} layers, random weights, "
             f"greedy, {res['prompt']}-token prompts. Copy bandwidth measured: {bw:.2f} TB/s. "
             f"Fused NF4 expert kernel up to "
             f"{env.get('fused_max_rows')} rows per layer, above that all experts dequantized + grouped GEMM.", "",
             "## Decode", "",
             "| path | batch | new tokens | tokens/s (total) | ms/step | limit tokens/s | share of limit | "
             "prefill s | first call s (build + decode) | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["decode"]:
        first = f"{r['first_call_s']:.1f}" if "first_call_s" in r else ""
        lines.append(f"| {r['path']} | {r['batch']} | {r['new']} | {r['tokens_per_s']:,.1f} | {r['ms_per_step']:.1f} | "
                     f"{r['limit_tokens_per_s']:,.0f} | {r['tokens_per_s'] / r['limit_tokens_per_s']:.0%} | "
                     f"{r['prefill_s']:.2f} | {first} | {r['peak_gib']:.1f} |")
    lines += ["", f"## Log-likelihood scoring ({res['ll_tokens']}-token items, no-grad forward, logits_to_keep=1)",
              "", "| batch | items/s | peak GiB |", "|---|---|---|"]
    for r in res["loglik"]:
        lines.append(f"| {r['batch']} | {r['items_per_s']:.1f} | {r['peak_gib']:.1f} |")
    if res.get("auto_batch") is not None:
        lines += ["", f"Batch size chosen from free memory by `auto_batch_size`: {res['auto_batch']}."]
    return "\n".join(lines) + "\n"


def run(*, layers: int = 48, batches=(1, 20, 32), prompt: int = 256, new: int = 256, baseline_new: int = 16,
        baseline_batches=(1, 20), compiled_batches=(1,), lora_batches=(1, 20), ll_tokens: int = 300,
        ll_batches=(2, 8, 32, 64), partial: Path | None = None) -> dict:
    """The whole benchmark (module doc); returns the results dict (``to_markdown`` renders it). ``partial``: a JSON
    file rewritten after every measurement, so that a run cut short by a time limit keeps what it measured."""
    res = dict(environment=environment(), layers=layers, prompt=prompt, ll_tokens=ll_tokens, decode=[], loglik=[])
    try:
        import triton

        res["environment"]["triton"] = triton.__version__
    except ImportError:
        pass
    res["environment"]["fused_max_rows"] = l4.Llama4NF4Experts.fused_max_rows
    res["copy_bandwidth"] = copy_bandwidth()
    model, _ = build_model(layers, "medtune")
    model.eval()
    res["weights_gib"] = l4.weights_gib(model)

    def limit(row, m):
        b = step_bytes(m, row["batch"], prompt + row["new"] // 2)
        row["step_bytes"] = b
        row["limit_tokens_per_s"] = row["batch"] / (b["total"] / res["copy_bandwidth"])
        res["decode"].append(row)
        print(row, flush=True)
        save()

    def save():
        if partial is not None:
            partial.write_text(json.dumps(res, indent=2, default=str))

    for batch in batches:
        limit(time_medtune(model, batch, prompt, new), model)
    for batch in baseline_batches:
        limit(time_generate(model, batch, prompt, baseline_new), model)
    for batch in ll_batches:
        res["loglik"].append(time_loglik(model, batch, ll_tokens))
        print(res["loglik"][-1], flush=True)
        save()
    free = torch.cuda.mem_get_info()[0]
    res["auto_batch"] = auto_batch_size(model, ll_tokens, free_bytes=free, limit=256)
    if res["auto_batch"] not in ll_batches:
        res["loglik"].append(dict(time_loglik(model, res["auto_batch"], ll_tokens), auto=True))
        save()
    for batch in compiled_batches:  # each builds for 1.5-2 min
        limit(time_medtune(model, batch, prompt, new, compile=True), model)
    if lora_batches:
        model = add_lora(model)
        for batch in lora_batches:
            row = time_medtune(model, batch, prompt, new)
            row["path"] = "medtune + LoRA r=64 (unmerged)"
            limit(row, model)
    return res
