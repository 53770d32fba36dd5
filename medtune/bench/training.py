"""Scout-shaped QLoRA benchmark on one GPU: the walkthrough's setup vs medtune's, side by side.

``python -m medtune.bench --tokens 2048 4096 --layers 1 3 --out outputs/bench``

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

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from medtune.bench.models import GIB, add_lora_and_head, build_model, free

VOCAB = 202048  # Scout's vocabulary: random token ids are drawn from it


def row_lengths(rows_file: str | Path, tokenizer_path: str | Path, language: str = "en") -> list[int]:
    """Token count of each row of a medical-o1 JSONL file in the training template (prompt + completion + EOS),
    tokenized with ``tokenizer_path`` as TRL's SFTTrainer does (:func:`medtune.stages.data.token_lengths`).

    Raises:
        medtune.stages.data.DataError: the file cannot be read, has no rows, or a row is not a usable
            Question/Complex_CoT/Response record (names the file, the line and the field, as 03 would).
        FileNotFoundError: ``tokenizer_path`` is not a folder with tokenizer files.
    """
    from transformers import AutoTokenizer

    from medtune.stages import data

    if not Path(tokenizer_path, "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"--tokenizer {tokenizer_path}: no tokenizer_config.json there; pass the folder of "
                                "the model's tokenizer (e.g. ../shared/tokenizers/llama4)")
    rows = data.validate_rows(data.read_records(rows_file), str(rows_file), bad_rows="fail")
    if not rows:
        raise data.DataError(f"{rows_file}: no rows to measure")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    return data.token_lengths(tok, language)(rows)


def write_lengths(path: str | Path, lengths: list[int], source: str) -> Path:
    """``{"source", "lengths"}`` as JSON: the workload file ``--lengths`` reads (token counts only, no text).

    Raises:
        ValueError: ``lengths`` is empty (nothing is written).
    """
    if not lengths:
        raise ValueError("no lengths to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": source, "lengths": lengths}))
    return path


def read_lengths(path: str | Path) -> list[int]:
    """The ``lengths`` list of a file written by :func:`write_lengths`.

    Raises:
        ValueError: the file is missing, unreadable, not JSON, or has no ``lengths`` list of positive integers
            (the message names the file and how to write one).
    """
    fix = ("write it with python -m medtune.bench --write-lengths FILE --rows-file ROWS.jsonl "
           "--tokenizer TOKENIZER_FOLDER")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read a lengths file ({type(err).__name__}: {err}); {fix}") from None
    lengths = data.get("lengths") if isinstance(data, dict) else None
    if not lengths or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths):
        raise ValueError(f"{path}: expected {{\"lengths\": [positive token counts]}}; {fix}")
    return lengths


def pack_bfd(lengths: list[int], limit: int) -> list[list[int]]:
    """Rows packed into sequences of at most ``limit`` tokens by best-fit decreasing, as TRL's
    ``packing_strategy="bfd"`` (each row goes to the fullest pack it still fits in). Rows longer than ``limit``
    get a pack of their own (TRL would truncate them)."""
    packs: list[list[int]] = []
    room: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, r in enumerate(room) if r >= n]
        if fits:
            i = min(fits, key=lambda j: room[j])
            packs[i].append(n)
            room[i] -= n
        else:
            packs.append([n])
            room.append(limit - n)
    return packs


def rows_batch(lengths: list[int], generator: torch.Generator, device="cuda") -> dict:
    """Model inputs for rows of ``lengths`` tokens (random ids) in one sequence, as TRL's padding-free collator
    builds them: ``position_ids`` restarting at 0 for each row, the first label of each row -100, no attention
    mask; ``use_cache=False`` as ``SFTTrainer.compute_loss`` passes. One row is a plain (1, n) sequence."""
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), device=device, generator=generator)
    if len(lengths) == 1:
        return dict(input_ids=ids, labels=ids.clone(), use_cache=False)
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    labels = ids.clone()
    labels[pos == 0] = -100
    return dict(input_ids=ids, labels=labels, position_ids=pos, use_cache=False)


def lora_bf16_(model):
    """LoRA parameters in bf16, as TRL's SFTTrainer casts a 4-bit model's adapters (sft_trainer.py, PEFT #2889)."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return model


def optimizer_step(model, batch: dict, opt: torch.optim.Optimizer) -> torch.Tensor:
    """One training step as the benchmarks time it: forward under bf16 autocast with TRL's fused LM head and loss
    (what SFTTrainer runs), backward, ``opt.step()``, gradients freed. Returns the loss (a 0-d tensor; not read
    here, so no host sync)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, fused_lm_head=True).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def time_batches(model, batches: list[dict], *, warmup: int = 1) -> dict:
    """One optimizer step (bf16 autocast, TRL fused LM head, torch fused AdamW) per batch of ``batches``, after
    ``warmup`` steps on the first. Returns tokens/s over all timed steps (sum of tokens / sum of seconds), the
    median step ms, mean tokens per step, peak GiB (``max_memory_allocated``) and the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times, tokens = [], []
    loss = torch.zeros(())
    for i, batch in enumerate([batches[0]] * warmup + list(batches)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = optimizer_step(model, batch, opt)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(batch["input_ids"].shape[1])
    del opt
    return dict(steps=len(times), tokens_per_s=sum(tokens) / sum(times), step_ms=statistics.median(times) * 1e3,
                mean_tokens=sum(tokens) / len(tokens), peak_gib=torch.cuda.max_memory_allocated() / GIB,
                loss_last=float(loss))


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
        loss = optimizer_step(model, dict(input_ids=ids, labels=ids), opt)
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
        for _ in range(7):
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
    for _ in range(7):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = base.lm_head(hid)
            loss = nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    out["lm_head_and_loss_unfused"] = statistics.median(ts[2:]) * 1e3
    del model, base
    layer = moe = None  # noqa: F841 - released before free(); the closures over them have run
    free()
    return out


def to_markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# Scout-shaped QLoRA benchmark, one {env['gpu']}", "",
             f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}. Random weights from Scout's text config; LoRA r=64/alpha=16 on "
             "q/k/v/o/gate/up/down_proj; gradient checkpointing; TRL fused LM head; one sequence per step. "
             f"NF4 experts dequantized {env.get('nf4_dequant_group', 1)} per call; routed experts skipped in the "
             f"checkpoint recompute: {env.get('skip_recompute', False)}.", "",
             "## Per decoder layer (from 1- and 3-layer models) and projected to 48 layers", "",
             "| setup | tokens | weights GiB/layer | ms/layer | peak GiB (largest model) "
             "| projected 48-layer tokens/s |",
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
    if res.get("real_rows"):
        rr = res["real_rows"]
        ln = rr["lengths"]
        lines += ["", f"## The real rows ({ln['rows']} rows, {ln['min']}-{ln['max']} tokens, mean {ln['mean']:.0f}), "
                  "full model, no double quant", "",
                  "| steps | mean tokens/step | tokens/s | step ms (median) | peak GiB | minutes for 480 rows |",
                  "|---|---|---|---|---|---|"]
        labels = {"batch1": "one row per step (walkthrough)", "packed": f"packed to {rr['packed']['pack_to']:,}"}
        for key, label in labels.items():
            r = rr[key]
            lines.append(f"| {label} | {r['mean_tokens']:,.0f} | {r['tokens_per_s']:,.0f} | {r['step_ms']:,.0f} | "
                         f"{r['peak_gib']:.1f} | {r['profile_minutes']:.1f} |")
    if res.get("profile"):
        lines += ["", f"## Where one medtune layer's time goes ({res['profile']['tokens']:,} tokens, fwd+bwd, ms)",
                  "", "| part | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in res["profile"].items() if k != "tokens"]
    return "\n".join(lines) + "\n"


def real_rows(model, lengths: list[int], *, rows: int, pack_to: int, seed: int = 0) -> dict:
    """The real workload on ``model`` (LoRA and head already added): ``rows`` rows drawn (seeded) from ``lengths``
    plus the longest, one per optimizer step as the walkthrough trains (``per_device_train_batch_size`` 1); then
    the same distribution packed to ``pack_to`` tokens per step (:func:`pack_bfd` of 8 x ``pack_to`` tokens' worth
    of rows, the first 4 packs timed). Returns ``{"batch1": ..., "packed": ...}`` of :func:`time_batches` results,
    the packed one with ``rows_per_pack``."""
    import random

    rnd = random.Random(seed)
    gen = torch.Generator("cuda").manual_seed(seed)
    drawn = rnd.sample(lengths, min(rows, len(lengths)) - 1) + [max(lengths)]
    out = {"batch1": time_batches(model, [rows_batch([n], gen) for n in drawn])}
    pool = rnd.sample(lengths, min(len(lengths), 8 * pack_to // max(1, sum(lengths) // len(lengths))))
    packs = pack_bfd(pool, pack_to)[:4]
    out["packed"] = dict(pack_to=pack_to, rows_per_pack=[len(p) for p in packs],
                         **time_batches(model, [rows_batch(p, gen) for p in packs]))
    return out


def training_minutes(lengths: list[int], rows: int, tokens_per_s: float) -> float:
    """GPU minutes of one epoch over ``rows`` rows of the mean length of ``lengths`` at ``tokens_per_s``."""
    return rows * (sum(lengths) / len(lengths)) / tokens_per_s / 60
