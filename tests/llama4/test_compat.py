"""medtune.compat: TRL 1.16 SFTTrainer on tiny Llama 4 models (CPU, random weights, the real Llama 4 tokenizer).

Each workaround has a test that shows the bug without it: when upstream fixes the bug, that test fails and says
the workaround can go.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

from medtune import compat

# CI lays shared/ beside the clone
TOKENIZER = str(Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "llama4")
# intermediate_size 64, not 32: see tests/llama4/test_llama4.py (bitsandbytes' AVX512-BF16 CPU repacking)
TEXT = dict(vocab_size=201135, hidden_size=64, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
            pad_token_id=200018, eos_token_id=200008, bos_token_id=200000)
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, vision_output_dim=64,
              image_size=56, patch_size=14, projector_input_dim=64, projector_output_dim=64)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def build(kind: str):
    torch.manual_seed(0)
    if kind == "causal":
        return Llama4ForCausalLM(Llama4TextConfig(**TEXT))
    return Llama4ForConditionalGeneration(Llama4Config(text_config=TEXT, vision_config=VISION))


def trainer_for(model, tokenizer, tmp_path, peft=True):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"text": f"Question {i}: what is {i} plus {i}? Answer: {2 * i}."} for i in range(6)])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                     max_length=32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=r"(language_model\.)?model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|feed_forward\.shared_expert\.\w+_proj)")
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      peft_config=lora if peft else None)


@pytest.mark.parametrize("kind", ["causal", "multimodal"])
def test_sft_trains_llama4_with_fix(kind, tokenizer, tmp_path):
    model = compat.apply_llama4_trl_fixes(build(kind))
    assert compat.apply_llama4_trl_fixes(model) is model  # idempotent
    trainer = trainer_for(model, tokenizer, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    assert all(torch.isfinite(torch.tensor([h["loss"], h["aux_loss"]])).all() for h in logs)  # aux loss: fix (b)
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert before and set(changed) == set(before)  # every LoRA matrix moved (A too, once B is non-zero)
    # The first step's loss is the model's own: log(V) for a random tiny model, not the fused path's garbage.
    assert abs(logs[0]["loss"] - torch.log(torch.tensor(201135.0)).item()) < 0.5


@pytest.mark.parametrize("kind", ["causal", "multimodal"])
def test_unpatched_sft_fails_on_base_model(kind, tokenizer, tmp_path):
    """Bug (a). When this test fails, TRL or transformers fixed it: delete the base_model part of the fix."""
    trainer = trainer_for(build(kind), tokenizer, tmp_path, peft=False)
    with pytest.raises(AttributeError, match="last_hidden_state"):
        trainer.train()


def test_unpatched_sft_fails_on_num_experts(tokenizer, tmp_path, monkeypatch):
    """Bug (b). When this test fails, TRL or transformers fixed it: delete the attribute_map part of the fix."""
    model = compat.apply_llama4_trl_fixes(build("causal"))
    monkeypatch.setattr(Llama4TextConfig, "attribute_map", compat.ORIGINAL_LLAMA4_TEXT_ATTRIBUTE_MAP)
    trainer = trainer_for(model, tokenizer, tmp_path, peft=False)
    with pytest.raises(AttributeError, match="num_experts"):
        trainer.train()


def test_multimodal_backbone_is_the_models_own_forward_without_lm_head():
    model = compat.apply_llama4_trl_fixes(build("multimodal")).eval()
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    image_tokens = 4  # (56/14)^2 patches, pixel shuffle 0.5 -> 4 tokens
    ids = torch.tensor([[200000, 11, 12] + [model.config.image_token_index] * image_tokens + [13, 14]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        hidden = model.base_model(input_ids=ids, pixel_values=pixels).last_hidden_state
        text_only = model.base_model(input_ids=ids).last_hidden_state
    assert torch.equal(model.language_model.lm_head(hidden), logits)
    assert not torch.allclose(hidden, text_only)  # the image features were merged
    # The fix adds no weights and keeps the checkpoint layout.
    assert all(k.startswith(("vision_model.", "multi_modal_projector.", "language_model.")) for k in model.state_dict())
    assert type(model.get_decoder()) is type(build("multimodal").get_decoder())  # unchanged by the fix


def test_fix_is_noop_for_other_models(caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with caplog.at_level("INFO", logger="medtune.compat"):
        assert compat.apply_llama4_trl_fixes(model) is model
    assert model.base_model is model.model and "not a Llama 4 model" in caplog.text


def test_trl_casts_cpu_adapters_to_bf16_and_the_fix_restores_compute_dtype(tmp_path):
    """TRL 1.16 makes LoRA adapters of a quantized model bf16 even on CPU (6x slower without bf16 units). The first
    assertion fails once TRL stops doing that: then delete compat.cpu_adapters_in_compute_dtype."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from medtune.compat import cpu_adapters_in_compute_dtype

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=201135, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=bnb, device_map={"": "cpu"},
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, use_cpu=True, report_to=[], save_strategy="no")
    trainer = SFTTrainer(model=model, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{"text": "a b c"}] * 2),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.bfloat16}  # TRL's cast (the behaviour worked around)
    assert cpu_adapters_in_compute_dtype(trainer) == len(trainable) == 4
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    assert cpu_adapters_in_compute_dtype(trainer) == 0  # idempotent


def legacy_checkpoint(tmp_path):
    """A tiny multimodal Llama 4 saved by transformers 5, with config.json edited as transformers 4.51.x wrote Scout's:
    legacy ``torch_dtype`` and ``"attn_temperature_tuning": 4`` in its text_config."""
    import json

    folder = tmp_path / "legacy"
    build("multimodal").save_pretrained(folder)
    conf = json.loads((folder / "config.json").read_text())
    conf["text_config"]["attn_temperature_tuning"] = 4
    conf["torch_dtype"] = conf.pop("dtype", "float32")
    (folder / "config.json").write_text(json.dumps(conf))
    return folder


def test_transformers_refuses_the_legacy_attn_temperature_tuning(tmp_path):
    """The bug the workaround exists for: when this test fails, transformers accepts the file again and
    compat.load_config's cleaning can go."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    with pytest.raises(StrictDataclassError, match="attn_temperature_tuning"):
        AutoConfig.from_pretrained(legacy_checkpoint(tmp_path))


def test_load_config_cleans_legacy_values_and_the_loaders_use_it(tmp_path, caplog):
    from transformers import BitsAndBytesConfig

    from medtune import llama4 as l4
    from medtune.stages import modeling

    folder = legacy_checkpoint(tmp_path)
    conf = compat.load_config(folder)
    assert conf.model_type == "llama4" and conf.text_config.attn_temperature_tuning is True
    assert "text_config.attn_temperature_tuning: 4 -> True" in caplog.text
    assert modeling.model_type(str(folder)) == "llama4"
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = l4.load_llama4_qlora(folder, bnb, device="cpu", torch_dtype=torch.float32)
    assert model.config.text_config.attn_temperature_tuning is True
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[200000, 1, 2, 3]])).logits
    assert logits.shape == (1, 4, TEXT["vocab_size"]) and torch.isfinite(logits).all()


def test_normalize_legacy_config_leaves_valid_values_and_reports_changes():
    conf = {"model_type": "llama4", "text_config": {"attn_temperature_tuning": True}, "vision_config": {}}
    assert compat.normalize_legacy_config(conf) == []
    conf["text_config"]["attn_temperature_tuning"] = 0
    assert compat.normalize_legacy_config(conf) == ["text_config.attn_temperature_tuning: 0 -> False"]
    assert conf["text_config"]["attn_temperature_tuning"] is False


def test_load_config_names_the_key_it_cannot_clean(tmp_path):
    import json

    folder = legacy_checkpoint(tmp_path)
    conf = json.loads((folder / "config.json").read_text())
    conf["text_config"]["attn_temperature_tuning"] = "yes"  # no known legacy form: refused with the key and the fix
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"(?s)legacy/config.json: transformers refuses a value in it .*"
                                         r"attn_temperature_tuning.*Edit that key"):
        compat.load_config(folder)
