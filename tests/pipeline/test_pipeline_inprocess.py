"""The pipeline's steps in one process on real inputs: the 604 real dataset rows on SmolLM2, and a tiny Llama 4
checkpoint in Scout's layout with the real Llama 4 tokenizer, through medtune's load -> LoRA -> SFT -> generate."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from medtune.evaluation import heldout
from medtune.settings import config
from medtune.settings.runs import RunDir
from medtune.stages import data, modeling, train
from tests.helpers import tiny_scout_config

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
REAL_ROWS = SHARED / "data" / "medical-o1" / "medical_o1_sft_en_604.jsonl"
LLAMA4_TOKENIZER = SHARED / "tokenizers" / "llama4"


def profile(tmp_path: Path, base: str = "smoke", **changes) -> config.RunConfig:
    d = yaml.safe_load((ROOT / "params" / f"{base}.yaml").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            d.setdefault(key, {}).update(value)
        else:
            d[key] = value
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(d))
    return config.load(path)


@pytest.mark.slow
def test_real_rows_short_training_lowers_heldout_loss(tmp_path, monkeypatch):
    """The 604 real rows read and length-checked: with max_length 512 (SmolLM2 tokens) the 588 longer ones are
    skipped and listed (bad_rows: skip; truncation would cut their answers), 16 remain, 4 held out; 6 optimizer
    steps lower the held-out response loss of SmolLM2-135M."""
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    cfg = profile(tmp_path, dataset=str(REAL_ROWS), max_rows=None, heldout_size=4, bad_rows="skip",
                  sft={"max_steps": 6, "learning_rate": 5e-4, "max_length": 512, "save_steps": 100})
    run = RunDir.create(cfg)
    model, tok = modeling.load_model(cfg)
    summary = data.prepare(cfg, run, tok)
    assert summary["bad_rows"]["read"] == 604 and summary["bad_rows"]["skipped"] == 588
    assert (summary["rows"], summary["train"], summary["heldout"]) == (16, 12, 4)
    assert summary["first_text"].endswith("<|im_end|>") and "### Question:\n" in summary["first_text"]
    before = heldout.heldout_loss(cfg, run, model, tok)
    trainer = train.build_trainer(cfg, run, model, tok)
    result = train.train(trainer, run)
    after = heldout.heldout_loss(cfg, run, trainer.model, tok)
    assert result["steps"] == 6 and before["tokens"] == after["tokens"] > 200
    assert after["loss"] < before["loss"] - 0.02, (before, after)


def tiny_scout_checkpoint(folder: Path) -> Path:
    """A Llama4ForConditionalGeneration saved as Scout is (language_model.* keys, fused 3-D experts), random
    weights at toy sizes, with the real Llama 4 tokenizer beside it."""
    from transformers import Llama4ForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_scout_config()
    Llama4ForConditionalGeneration(config).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA4_TOKENIZER / f, folder / f)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("fast", [True, False], ids=["medtune-path", "walkthrough-path"])
def test_tiny_llama4_through_medtune(tmp_path, monkeypatch, fast):
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    ckpt = tiny_scout_checkpoint(tmp_path / "scout-tiny")
    regex = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # the illustrative rows fit 384 Llama 4 tokens (longest 367): nothing is truncated or skipped
    cfg = profile(tmp_path, model=str(ckpt), dataset="package:medtune/assets/medical_reasoning_illustrative.jsonl",
                  max_rows=12, max_new_tokens=4, llama4_fast=fast, lora={"r": 8, "target_modules": regex},
                  sft={"max_steps": 2, "learning_rate": 1e-2, "max_length": 384, "save_steps": 100,
                       "router_aux_loss_coef": 0.0})
    run = RunDir.create(cfg)
    model, tok = modeling.load_model(cfg)
    assert (tok.eos_token, tok.pad_token) == ("<|eot|>", "<|finetune_right_pad|>")
    moe = model.language_model.model.layers[1].feed_forward
    assert type(moe).__name__ == ("Llama4SparseMoe" if fast else "Llama4TextMoe")
    assert type(moe.experts).__name__ == ("Llama4NF4Experts" if fast else "Llama4TextExperts")
    assert type(model.language_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    cached = modeling.nf4_experts_cache(cfg, double_quant=False, checkpoint=modeling.resolve_model(cfg))
    cached = cached / "experts-nf4.safetensors"
    assert cached.is_file() == fast  # quantized once, reused by later loads of the run

    summary = data.prepare(cfg, run, tok)
    assert summary["first_text"].endswith("<|eot|>")
    trainer = train.build_trainer(cfg, run, model, tok)
    wrapped = {n for n, _ in trainer.model.named_modules() if n.endswith("lora_A")}
    assert wrapped and not any("vision" in n for n in wrapped)
    result = train.train(trainer, run)
    assert result["steps"] == 2 and torch.isfinite(torch.tensor(result["train_loss"]))

    model2, tok2 = modeling.load_model(cfg, adapter=run.adapter_dir)
    answers = heldout.answer_heldout(cfg, run, model2, tok2, run.finetuned_path)
    assert len(answers) == cfg.heldout_size and all(0 < a["new_tokens"] <= 4 for a in answers)
    assert re.fullmatch(r"\d+", str(answers[0]["row"]))
