"""``python -m medtune.bench``: the Scout-shaped benchmarks on one GPU.

Training (default; :mod:`medtune.bench.training`): ``python -m medtune.bench --tokens 2048 4096 --layers 1 3``.
Generation and log-likelihood (:mod:`medtune.bench.generation`): ``python -m medtune.bench --generate``.
Results go to ``--out`` (default outputs/bench/) as JSON and markdown, and the markdown is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medtune import llama4 as l4
from medtune.bench import generation, training
from medtune.bench.models import add_lora_and_head, build_model, environment, free

SHARED = Path(__file__).resolve().parents[3] / "shared"  # the checkout's ../shared (rows, tokenizer), if present


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m medtune.bench", description=__doc__.split("\n")[0])
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
                        help="the generation and log-likelihood benchmark instead (medtune.bench.generation)")
    parser.add_argument("--gen-layers", type=int, default=48)
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[1, 20, 32],
                        help="decode batch sizes (20: scout.yaml's held-out questions, answered as one batch)")
    parser.add_argument("--gen-prompt", type=int, default=256)
    parser.add_argument("--gen-new", type=int, default=256)
    parser.add_argument("--gen-baseline-new", type=int, default=16)
    parser.add_argument("--gen-baseline-batches", type=int, nargs="*", default=[1, 20])
    parser.add_argument("--gen-compiled-batches", type=int, nargs="*", default=[1],
                        help="decode batch sizes also timed with the step compiled (greedy_decode(compile=True))")
    parser.add_argument("--gen-lora-batches", type=int, nargs="*", default=[1, 20])
    parser.add_argument("--ll-batches", type=int, nargs="*", default=[2, 8, 32, 64])
    parser.add_argument("--lengths", type=Path, default=None,
                        help="token counts of the training rows (--write-lengths): also time the real rows on the "
                             "full model, one per step and packed")
    parser.add_argument("--real-rows", type=int, default=12, help="rows drawn from --lengths for batch-1 steps")
    parser.add_argument("--pack-to", type=int, default=4096)
    parser.add_argument("--profile-rows", type=int, default=480,
                        help="training rows of the profile whose GPU minutes are reported (scout.yaml: 480)")
    parser.add_argument("--write-lengths", type=Path, default=None, metavar="FILE",
                        help="write the token counts of --rows-file in the training template and exit (CPU)")
    parser.add_argument("--rows-file", type=Path,
                        default=SHARED / "data" / "medical-o1" / "medical_o1_sft_en_604.jsonl")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llama4")
    args = parser.parse_args(argv)
    if args.write_lengths:
        lengths = training.row_lengths(args.rows_file, args.tokenizer)
        training.write_lengths(args.write_lengths, lengths, f"{args.rows_file.name}, training template, "
                                                            f"tokenizer {args.tokenizer.name}")
        print(f"{args.write_lengths}: {len(lengths)} rows, {min(lengths)}-{max(lengths)} tokens, "
              f"mean {sum(lengths) / len(lengths):.0f}")
        return {"lengths": lengths}
    lengths = None
    if args.lengths:  # checked before any GPU work: a bad file must not cost the measurements
        lengths = training.read_lengths(args.lengths)
        if args.real_rows < 1 or args.pack_to < max(1, min(lengths)) or args.full < 1:
            parser.error(f"--lengths needs --real-rows >= 1 (got {args.real_rows}), --pack-to of at least the "
                         f"shortest row ({min(lengths)} tokens; got {args.pack_to}) and --full >= 1 (got {args.full})")
    if args.generate:  # checked before any GPU work: a bad flag must not cost the model's build or the rows before it
        _check_generation_args(parser, args)
    if not torch.cuda.is_available():
        raise SystemExit("medtune.bench needs a CUDA GPU")
    if args.generate:
        args.out.mkdir(parents=True, exist_ok=True)
        res = generation.run(layers=args.gen_layers, batches=args.gen_batches, prompt=args.gen_prompt,
                                 new=args.gen_new, baseline_new=args.gen_baseline_new,
                                 baseline_batches=args.gen_baseline_batches, lora_batches=args.gen_lora_batches,
                                 compiled_batches=args.gen_compiled_batches,
                                 ll_batches=args.ll_batches, partial=args.out / "generate.partial.json")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generate.json").write_text(json.dumps(res, indent=2, default=str))
        md = generation.to_markdown(res)
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
                runs[n] = training.time_training(model, tokens, steps=args.steps, warmup=args.warmup)
                del model
                free()
                print(setup, tokens, n, runs[n], flush=True)
            per_layer = (runs[l2]["step_ms"] - runs[l1]["step_ms"]) / (l2 - l1)
            projected = runs[l1]["step_ms"] + (48 - l1) * per_layer
            res["per_layer"].append(dict(setup=setup, tokens=tokens, layer_gib=layer_gib, ms_per_layer=per_layer,
                                         peak_gib=runs[l2]["peak_gib"], projected_step_ms=projected,
                                         projected_tokens_per_s=tokens / projected * 1e3, runs=runs))
    if not args.no_profile:
        res["profile"] = dict(tokens=max(args.tokens), **training.profile_layer(max(args.tokens)))
    if args.full:
        for dq in (False, True):
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            model, _ = build_model(args.full, "medtune", double_quant=dq)
            build_s = time.perf_counter() - t0
            weights = l4.weights_gib(model)
            model = add_lora_and_head(model)
            training.lora_bf16_(model)  # as SFTTrainer casts a 4-bit model's adapters
            run = training.time_training(model, max(args.tokens), steps=args.full_steps, warmup=1)
            res["full"].append(dict(double_quant=dq, tokens=max(args.tokens), layers=args.full, weights_gib=weights,
                                    build_s=build_s, **run))
            if lengths and not dq:
                real = training.real_rows(model, lengths, rows=args.real_rows, pack_to=args.pack_to)
                for key in ("batch1", "packed"):
                    real[key]["profile_minutes"] = training.training_minutes(lengths, args.profile_rows,
                                                                             real[key]["tokens_per_s"])
                res["real_rows"] = dict(lengths=dict(rows=len(lengths), min=min(lengths), max=max(lengths),
                                                     mean=sum(lengths) / len(lengths)), **real)
                print("real rows", res["real_rows"], flush=True)
            print("full", res["full"][-1], flush=True)
            del model
            free()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    md = training.to_markdown(res)
    (args.out / "results.md").write_text(md)
    print(md)
    return res


def _check_generation_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--generate`` flags that would fail only once the benchmark runs (after the model is built, or after
    every row before them): batch sizes and lengths below 1, fewer than 2 new tokens (the decode rate is over the
    tokens after the first), or a prompt and answer longer than Scout's attention chunk (greedy_decode's limit)."""
    wrong = []
    for flag in ("gen_batches", "gen_baseline_batches", "gen_compiled_batches", "gen_lora_batches", "ll_batches"):
        bad = [b for b in getattr(args, flag) if b < 1]
        if bad:
            wrong.append(f"--{flag.replace('_', '-')} must be batch sizes >= 1 (got {' '.join(map(str, bad))})")
    for flag, least in (("gen_layers", 1), ("gen_prompt", 1), ("gen_new", 2), ("gen_baseline_new", 2)):
        if getattr(args, flag) < least:
            wrong.append(f"--{flag.replace('_', '-')} must be >= {least} (got {getattr(args, flag)})")
    chunk = l4.scout_text_config().attention_chunk_size
    if args.gen_prompt + args.gen_new > chunk:
        wrong.append(f"--gen-prompt + --gen-new must fit Scout's attention chunk of {chunk} tokens (got "
                     f"{args.gen_prompt} + {args.gen_new})")
    if wrong:
        parser.error("; ".join(wrong))


if __name__ == "__main__":
    main()
