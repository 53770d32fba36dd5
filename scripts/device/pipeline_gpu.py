"""medtune's own pipeline functions on one GPU with a Scout-shaped checkpoint (run on the device machine).

A Llama4ForConditionalGeneration at Scout's real dimensions but 2 decoder layers (random weights; ~15 GB of bf16
safetensors) is written with save_pretrained, exactly the layout of the Hub checkpoint. Then, through medtune's
functions as the notebooks call them: quantized load (routed experts streamed and quantized to NF4 on the GPU;
peak GPU memory during the load is reported against the bf16 size), data formatting, held-out loss, SFT steps,
reload with the adapter (reusing the cached NF4 experts) and greedy generation.

Usage: python scripts/device/pipeline_gpu.py OUT_DIR   (needs the real Llama 4 tokenizer in .carry/llama4-tok)
"""

import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pipeline_gpu")
OUT.mkdir(parents=True, exist_ok=True)
WORK = Path("/tmp/medtune-gpu")
GIB = 2**30
report: dict = {}


def log(key, value):
    report[key] = value
    print(f"{key}: {value}", flush=True)
    (OUT / "pipeline_gpu.json").write_text(json.dumps(report, indent=2, default=str))


def build_checkpoint(folder: Path) -> None:
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from medtune.llama4 import scout_text_config

    text = scout_text_config(num_hidden_layers=2, pad_token_id=200018, eos_token_id=200008, bos_token_id=200000)
    cfg = Llama4Config(text_config=text.to_dict())
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Llama4ForConditionalGeneration(cfg).to(torch.bfloat16)
    for p in model.parameters():  # small weights so activations stay finite through the random layers
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(folder, max_shard_size="5GB")
    log("checkpoint_gib", round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GIB, 2))
    del model
    torch.cuda.empty_cache()
    tok = ROOT / ".carry" / "llama4-tok"
    shutil.copy(tok / "tokenizer_config.json", folder / "tokenizer_config.json")
    with gzip.open(tok / "tokenizer.json.gz", "rb") as src, open(folder / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)


def main() -> None:
    import yaml

    from medtune.evaluation import heldout
    from medtune.settings import config
    from medtune.settings.runs import RunDir
    from medtune.stages import data, modeling, train

    ckpt = WORK / "scout-2layer"
    if not (ckpt / "config.json").is_file():
        t = time.perf_counter()
        build_checkpoint(ckpt)
        log("build_s", round(time.perf_counter() - t, 1))

    d = yaml.safe_load((ROOT / "params" / "scout.yaml").read_text())
    d.update(model=str(ckpt), dataset="package:medtune/assets/medical_reasoning_illustrative.jsonl",
             dataset_config=None, max_rows=24, heldout_size=4, max_new_tokens=16, eval_batch_size=2)
    if "source" in config.RunConfig.__dataclass_fields__:
        d["source"] = "local"
    d["sft"] = {**d["sft"], "max_steps": 4, "save_steps": 100, "logging_steps": 1, "max_length": 1024}
    (WORK / "profile.yaml").write_text(yaml.safe_dump(d))
    cfg = config.load(WORK / "profile.yaml")
    import os

    os.environ["MEDTUNE_OUTPUTS"] = str(WORK / "outputs")
    os.environ["MEDTUNE_CACHE"] = str(WORK / "cache")
    run = RunDir.create(cfg)

    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model, tok = modeling.load_model(cfg)
    log("load_s", round(time.perf_counter() - t, 1))
    log("load_peak_gib", round(torch.cuda.max_memory_allocated() / GIB, 2))
    rep = modeling.quantization_report(model)
    log("loaded_gib", rep["footprint_gib"])
    log("quantized_linear", rep["quantized_linear"])
    log("experts_type", type(model.language_model.model.layers[0].feed_forward.experts).__name__)

    summary = data.prepare(cfg, run, tok)
    log("data", {k: v for k, v in summary.items() if k != "first_text"})
    before = heldout.heldout_loss(cfg, run, model, tok)
    log("baseline_loss", before)
    t = time.perf_counter()
    answers = heldout.answer_heldout(cfg, run, model, tok, run.baseline_path)
    log("generate_s", round(time.perf_counter() - t, 1))
    log("baseline_new_tokens", [a["new_tokens"] for a in answers])

    torch.cuda.reset_peak_memory_stats()
    trainer = train.build_trainer(cfg, run, model, tok)
    result = train.train(trainer, run)
    log("train", result)
    after = heldout.heldout_loss(cfg, run, trainer.model, tok)
    log("trained_loss", after)
    del trainer, model
    torch.cuda.empty_cache()

    t = time.perf_counter()
    model2, tok2 = modeling.load_model(cfg, adapter=run.adapter_dir)  # NF4 experts from the cache this time
    log("reload_with_adapter_s", round(time.perf_counter() - t, 1))
    answers = heldout.answer_heldout(cfg, run, model2, tok2, run.finetuned_path)
    log("finetuned_new_tokens", [a["new_tokens"] for a in answers])
    log("ok", True)


if __name__ == "__main__":
    main()
