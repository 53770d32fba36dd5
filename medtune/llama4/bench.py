"""Scout-shaped QLoRA benchmark on one GPU: the walkthrough's setup vs medtune's, side by side.

``python -m medtune.llama4.bench --tokens 2048 4096 --layers 1 3 --out outputs/bench``

Models are built from Llama 4 Scout's text config (``medtune.llama4.SCOUT_TEXT_DIMS``: hidden 5120, expert dim
8192, 16 experts top-1, 40 heads, 8 KV heads, head dim 128, vocab 202,048) with random weights (normal, std
0.02; nothing downloaded), one decoder layer at a time on the GPU: each layer is made in bf16, its ``nn.Linear``
layers are converted to bitsandbytes ``Linear4bit`` (NF4, bf16 compute, as the walkthrough's
``BitsAndBytesConfig``) and then, for medtune, its routed experts to NF4 (:class:`medtune.llama4.Llama4NF4Experts`)
with sparse dispatch; the bf16 whole never exists. Embedding and LM head stay bf16 (bitsandbytes skips
``lm_head``).

Setups:
- ``walkthrough``: bnb 4-bit Linears, bf16 routed experts, transformers' dense dispatch.
- ``medtune``: bnb 4-bit Linears, NF4 routed experts (one dequantize call per projection, grouped GEMM, skipped in the
  checkpoint recompute: :mod:`medtune.llama4`), sparse top-k dispatch.
Both: LoRA r=64, alpha=16, dropout 0 on q/k/v/o_proj + shared expert gate/up/down_proj (PEFT), gradient
checkpointing, bf16 autocast, TRL's fused LM head and loss (what ``SFTTrainer`` runs), AdamW (torch, fused) on the
LoRA parameters, one sequence of ``--tokens`` tokens per step.

Measured: weights GiB per decoder layer; peak GiB (``torch.cuda.max_memory_allocated``) and resident GiB after the
last step (weights, LoRA parameters, optimizer state); step time (median of
``--steps`` after ``--warmup``), per layer from the ``--layers`` pair (t(L2) - t(L1)) / (L2 - L1), projected to 48
layers as t(L1) + (48 - L1) * per-layer; tokens/s = tokens / step time. Then the full 48-layer medtune model
(with and without double quant) at the largest ``--tokens``: peak GiB and tokens/s from real optimizer steps.
Writes ``results.json`` and ``results.md`` under ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from medtune import llama4 as l4

GIB = 2**30
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantize_linears(module: nn.Module, *, double_quant: bool) -> None:
    """Replace every plain ``nn.Linear`` under ``module`` by a bitsandbytes NF4 ``Linear4bit`` (bf16 compute),
    quantized on the Linear's device, as transformers' bitsandbytes integration does (it, too, converts only
    ``type(m) is nn.Linear``: Llama 4's router, an ``nn.Linear`` subclass, stays bf16)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=double_quant, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=double_quant, blocksize=64).to(child.weight.device)
            setattr(module, name, q)
        else:
            quantize_linears(child, double_quant=double_quant)


def build_model(layers: int, setup: str, *, double_quant: bool = False, device="cuda"):
    """Scout-shaped ``Llama4ForCausalLM`` with ``layers`` decoder layers, built layer by layer on ``device``.

    Returns (model, weights GiB of one decoder layer). ``setup`` is ``walkthrough`` or ``medtune`` (module doc).
    """
    from transformers import Llama4ForCausalLM
    from transformers.models.llama4.modeling_llama4 import (
        Llama4TextDecoderLayer,
        Llama4TextRMSNorm,
        Llama4TextRotaryEmbedding,
    )

    config = l4.scout_text_config(num_hidden_layers=layers, attn_implementation="sdpa")
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    gen = torch.Generator(device).manual_seed(0)

    def init_(module):
        for p in module.parameters():
            p.data.normal_(0.0, 0.02, generator=gen)
        return module

    with torch.device(device):
        model.model.embed_tokens = init_(nn.Embedding(config.vocab_size, config.hidden_size, dtype=torch.bfloat16))
        model.lm_head = init_(nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=torch.bfloat16))
        model.model.norm = Llama4TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(torch.bfloat16)
        model.model.rotary_emb = Llama4TextRotaryEmbedding(config)
        layer_gib = 0.0
        for i in range(layers):
            layer = init_(Llama4TextDecoderLayer(config, i).to(torch.bfloat16))
            quantize_linears(layer, double_quant=double_quant)
            if setup == "medtune":
                l4.prepare_moe(layer.feed_forward, double_quant=double_quant)
            model.model.layers[i] = layer
            layer_gib = l4.weights_gib(layer)
            torch.cuda.empty_cache()
    if setup == "medtune":  # nothing left to convert; registers the decoder-layer hooks (recompute skip)
        l4.prepare_llama4_for_qlora(model, double_quant=double_quant)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on meta: {meta[:3]}")
    model.requires_grad_(False)
    return model, layer_gib


def add_lora_and_head(model):
    """LoRA r=64/alpha=16 on LORA_TARGETS, gradient checkpointing, TRL's fused LM head (as SFTTrainer)."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from medtune.compat import apply_llama4_trl_fixes

    apply_llama4_trl_fixes(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def time_training(model, tokens: int, *, steps: int, warmup: int) -> dict:
    """Optimizer steps on one random ``tokens``-long sequence. Returns step ms (median), tokens/s, loss, peak GiB
    (``max_memory_allocated``), resident GiB after the last step (weights + LoRA parameters + optimizer state;
    gradients are freed), optimizer state GiB, trainable parameters (count and GiB)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, 202048, (1, tokens), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    ms = statistics.median(times) * 1e3
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if isinstance(t, torch.Tensor))
    return dict(step_ms=ms, tokens_per_s=tokens / ms * 1e3, loss_first=losses[0], loss_last=losses[-1],
                peak_gib=torch.cuda.max_memory_allocated() / GIB,
                resident_gib=torch.cuda.memory_allocated() / GIB, optimizer_state_gib=state_bytes / GIB,
                trainable_gib=sum(p.numel() * p.element_size() for p in params) / GIB,
                trainable_params=sum(p.numel() for p in params))


def free() -> None:
    """Return cached blocks after the caller dropped its references."""
    gc.collect()
    torch.cuda.empty_cache()


def profile_layer(tokens: int) -> dict:
    """ms of forward + backward (w.r.t. inputs and LoRA) of the parts of one medtune decoder layer at ``tokens``
    (attention with its LoRA, shared expert with its LoRA, routed experts NF4 sparse, router) and of the
    embedding + LM head + loss, measured separately with CUDA sync; each the median of 5 after 2 warm-ups."""
    model = add_lora_and_head(build_model(1, "medtune")[0])
    layer = model.base_model.model.model.layers[0]
    x = torch.randn(1, tokens, 5120, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(tokens, device="cuda")[None]
    rope = model.base_model.model.model.rotary_emb(x, pos)
    moe = layer.feed_forward
    h = x.reshape(-1, 5120)

    def routed():
        scores, logits = moe.router(h)
        idx = torch.topk(logits, 1, dim=1).indices
        order = idx.reshape(-1).argsort(stable=True)
        counts = torch.zeros(16, dtype=torch.int64, device=h.device).scatter_add_(0, idx.reshape(-1),
                                                                                    torch.ones_like(idx.reshape(-1)))
        return moe.experts(h[order] * scores.gather(1, idx)[order], counts)

    parts = {
        "attention": lambda: layer.self_attn(hidden_states=x, position_embeddings=rope, attention_mask=None)[0],
        "shared_expert": lambda: moe.shared_expert(h),
        "routed_experts": routed,
        "whole_layer": lambda: layer(x, position_embeddings=rope, attention_mask=None),
    }
    out = {}
    for name, fn in parts.items():
        ts = []
        for i in range(7):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn()
            y.float().square().mean().backward()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
            x.grad = None
        out[name] = statistics.median(ts[2:]) * 1e3
    ids = torch.randint(0, 202048, (1, tokens), device="cuda")
    base = model.base_model.model
    hid = torch.randn(1, tokens, 5120, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ts = []
    for i in range(7):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = base.lm_head(hid)
            loss = nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    out["lm_head_and_loss_unfused"] = statistics.median(ts[2:]) * 1e3
    del model, layer, moe, base
    free()
    return out


def environment() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__, bitsandbytes=bitsandbytes.__version__,
                nf4_dequant_group=l4.Llama4NF4Experts.dequant_group or "all",
                skip_recompute=l4.Llama4SparseMoe.skip_recompute)


def to_markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# Scout-shaped QLoRA benchmark, one {env['gpu']}", "",
             f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}. Random weights from Scout's text config; LoRA r=64/alpha=16 on "
             "q/k/v/o/gate/up/down_proj; gradient checkpointing; TRL fused LM head; one sequence per step. "
             f"NF4 experts dequantized {env.get('nf4_dequant_group', 1)} per call; routed experts skipped in the "
             f"checkpoint recompute: {env.get('skip_recompute', False)}.", "",
             "## Per decoder layer (from 1- and 3-layer models) and projected to 48 layers", "",
             "| setup | tokens | weights GiB/layer | ms/layer | peak GiB (largest model) | projected 48-layer tokens/s |",
             "|---|---|---|---|---|---|"]
    for r in res["per_layer"]:
        lines.append(f"| {r['setup']} | {r['tokens']:,} | {r['layer_gib']:.2f} | {r['ms_per_layer']:.1f} | "
                     f"{r['peak_gib']:.1f} | {r['projected_tokens_per_s']:,.0f} |")
    if res.get("full"):
        lines += ["", "## Full 48-layer Scout-shaped model, medtune setup, real optimizer steps", "",
                  "| double quant | tokens | weights GiB | resident GiB | peak GiB | step s | tokens/s | "
                  "loss first → last |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["full"]:
            lines.append(f"| {r['double_quant']} | {r['tokens']:,} | {r['weights_gib']:.1f} | "
                         f"{r.get('resident_gib', float('nan')):.1f} | {r['peak_gib']:.1f} | "
                         f"{r['step_ms'] / 1e3:.2f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['loss_first']:.3f} → {r['loss_last']:.3f} |")
    if res.get("profile"):
        lines += ["", f"## Where one medtune layer's time goes ({res['profile']['tokens']:,} tokens, fwd+bwd, ms)",
                  "", "| part | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in res["profile"].items() if k != "tokens"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--layers", type=int, nargs=2, default=[1, 3], help="two model depths for per-layer time")
    parser.add_argument("--setups", nargs="+", default=["walkthrough", "medtune"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--full", type=int, default=48, help="layers of the full model (0: skip)")
    parser.add_argument("--full-steps", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--generate", action="store_true",
                        help="the generation and log-likelihood benchmark instead (medtune.llama4.bench_generate)")
    parser.add_argument("--gen-layers", type=int, default=48)
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--gen-prompt", type=int, default=256)
    parser.add_argument("--gen-new", type=int, default=256)
    parser.add_argument("--gen-baseline-new", type=int, default=16)
    parser.add_argument("--gen-baseline-batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--gen-lora-batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--ll-batches", type=int, nargs="*", default=[2, 8, 32, 64])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("medtune.llama4.bench needs a CUDA GPU")
    if args.generate:
        from medtune.llama4 import bench_generate

        res = bench_generate.run(layers=args.gen_layers, batches=args.gen_batches, prompt=args.gen_prompt,
                                 new=args.gen_new, baseline_new=args.gen_baseline_new,
                                 baseline_batches=args.gen_baseline_batches, lora_batches=args.gen_lora_batches,
                                 ll_batches=args.ll_batches)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generate.json").write_text(json.dumps(res, indent=2, default=str))
        md = bench_generate.to_markdown(res)
        (args.out / "generate.md").write_text(md)
        print(md)
        return res

    res = dict(environment=environment(), args={k: str(v) for k, v in vars(args).items()}, per_layer=[], full=[])
    l1, l2 = args.layers
    for setup in args.setups:
        for tokens in args.tokens:
            runs = {}
            for n in (l1, l2):
                model, layer_gib = build_model(n, setup)
                model = add_lora_and_head(model)
                runs[n] = time_training(model, tokens, steps=args.steps, warmup=args.warmup)
                del model
                free()
                print(setup, tokens, n, runs[n], flush=True)
            per_layer = (runs[l2]["step_ms"] - runs[l1]["step_ms"]) / (l2 - l1)
            projected = runs[l1]["step_ms"] + (48 - l1) * per_layer
            res["per_layer"].append(dict(setup=setup, tokens=tokens, layer_gib=layer_gib, ms_per_layer=per_layer,
                                         peak_gib=runs[l2]["peak_gib"], projected_step_ms=projected,
                                         projected_tokens_per_s=tokens / projected * 1e3, runs=runs))
    if not args.no_profile:
        res["profile"] = dict(tokens=max(args.tokens), **profile_layer(max(args.tokens)))
    if args.full:
        for dq in (False, True):
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            model, _ = build_model(args.full, "medtune", double_quant=dq)
            build_s = time.perf_counter() - t0
            weights = l4.weights_gib(model)
            model = add_lora_and_head(model)
            run = time_training(model, max(args.tokens), steps=args.full_steps, warmup=1)
            res["full"].append(dict(double_quant=dq, tokens=max(args.tokens), layers=args.full, weights_gib=weights,
                                    build_s=build_s, **run))
            print("full", res["full"][-1], flush=True)
            del model
            free()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    (args.out / "results.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
