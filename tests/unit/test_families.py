"""medtune.families: the one "is this Llama 4" decision, from every kind of input its callers hold (model_type string,
config.json dict, transformers config, model bare or PEFT-wrapped), the repo-id fallback, bad input, and the callers
that ask it (a checkpoint folder, the model card's base, the memory estimate)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Llama4Config, Llama4TextConfig, LlamaConfig, LlamaForCausalLM

from medtune import families as F

SCOUT_ID = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8)


@pytest.mark.parametrize(("model_type", "expected"), [
    ("llama4", True), ("llama4_text", True), ("llama", False), ("mistral", False), ("", False),
    ("llama4_vision_model", False),  # Scout's vision tower alone is not a language model of the family
])
def test_model_type_strings(model_type, expected):
    assert F.is_llama4(model_type) is expected


def test_config_dicts_as_read_from_config_json():
    scout = json.loads(Llama4Config(text_config=Llama4TextConfig(**TINY)).to_json_string())
    assert scout["model_type"] == "llama4" and F.is_llama4(scout) is True
    assert F.is_llama4({"model_type": "llama4_text", "hidden_size": 16}) is True
    assert F.is_llama4({"model_type": "llama", "hidden_size": 16}) is False
    # a wrapper whose own model_type is something else: its text_config decides
    assert F.is_llama4({"model_type": "some_wrapper", "text_config": {"model_type": "llama4_text"}}) is True
    assert F.is_llama4({"model_type": "some_wrapper", "text_config": {"model_type": "llama"}}) is False


def test_transformers_configs():
    text = Llama4TextConfig(**TINY)
    assert F.is_llama4(text) is True
    assert F.is_llama4(Llama4Config(text_config=text)) is True
    assert F.is_llama4(LlamaConfig(**TINY)) is False


def test_models_bare_and_peft_wrapped():
    from peft import LoraConfig, get_peft_model
    from transformers import Llama4ForCausalLM

    llama4 = Llama4ForCausalLM(Llama4TextConfig(**TINY, num_local_experts=2, intermediate_size_mlp=32))
    llama = LlamaForCausalLM(LlamaConfig(**TINY))
    assert F.is_llama4(llama4) is True and F.is_llama4(llama) is False
    wrapped = get_peft_model(llama4, LoraConfig(r=2, target_modules=["q_proj"]))
    assert F.is_llama4(wrapped) is True
    assert F.is_llama4(get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))) is False


def test_llama4_package_name_gives_the_same_answer():
    from medtune import llama4

    for thing in ("llama4", "llama", Llama4TextConfig(**TINY), LlamaConfig(**TINY)):
        assert llama4.is_llama4(thing) is F.is_llama4(thing)


@pytest.mark.parametrize("bad", [None, 3, 2.5, object(), ["llama4"]])
def test_bad_input_is_a_type_error_naming_what_it_takes(bad):
    with pytest.raises(TypeError, match="takes a model, a config, a config dict or a model_type string; got "
                                        + type(bad).__name__):
        F.is_llama4(bad)


@pytest.mark.parametrize("bad", [SCOUT_ID, "/models/scout", "Llama4", "llama 4"])
def test_a_repo_id_or_path_string_is_a_value_error_naming_the_fix(bad):
    with pytest.raises(ValueError, match=r"is not a model_type .*modeling\.is_llama4\(path\).*is_llama4_repo_id"):
        F.is_llama4(bad)


def test_a_config_dict_without_model_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"a config dict needs a 'model_type' key; got keys \['hidden_size'\]"):
        F.is_llama4({"hidden_size": 16})


@pytest.mark.parametrize(("repo_id", "expected"), [
    (SCOUT_ID, True), ("LLM-Research/Llama-4-Scout-17B-16E-Instruct", True), ("someone/llama-4-maverick-copy", True),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", False), ("meta-llama/Llama-3.1-8B-Instruct", False),
    ("you/llama4-scout-medical-qlora", False),  # the fragment is Meta's "Llama-4", not any "llama4"
    ("", False), (None, False),
])
def test_repo_ids(repo_id, expected):
    assert F.is_llama4_repo_id(repo_id) is expected


def test_importing_it_loads_no_torch_or_transformers():
    code = "import sys, medtune.families; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# The callers: each asks the one function
# ---------------------------------------------------------------------------------------------------------------

def _checkpoint(folder: Path, config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config.to_json_string(), encoding="utf-8")
    return folder


def test_modeling_reads_a_checkpoint_folder(tmp_path):
    from medtune.stages import modeling

    scout = _checkpoint(tmp_path / "scout", Llama4Config(text_config=Llama4TextConfig(**TINY)))
    smol = _checkpoint(tmp_path / "smol", LlamaConfig(**TINY))
    assert modeling.model_type(str(scout)) == "llama4" and modeling.is_llama4(str(scout)) is True
    assert modeling.model_type(str(smol)) == "llama" and modeling.is_llama4(str(smol)) is False


def test_model_card_base_from_config_or_repo_id(tmp_path):
    from medtune.settings import config as C
    from medtune.stages import publish

    params = Path(__file__).resolve().parents[2] / "params"
    scout_cfg = C.load(params / "scout.yaml")
    assert publish.base_model(scout_cfg)["llama4"] is True  # a Hub id, no config here: the id decides
    assert publish.base_model(C.load(params / "smoke.yaml"))["llama4"] is False  # package: SmolLM2
    # a local folder that names no repo: its config.json decides
    unnamed = _checkpoint(tmp_path / "unnamed", Llama4Config(text_config=Llama4TextConfig(**TINY)))
    base = publish.base_model(scout_cfg.replace(model=str(unnamed), source="local"))
    assert base["id"] is None and base["llama4"] is True
    smol = _checkpoint(tmp_path / "smol", LlamaConfig(**TINY))
    assert publish.base_model(scout_cfg.replace(model=str(smol), source="local"))["llama4"] is False


def test_memory_estimate_counts_experts_only_for_llama4():
    from medtune.stages import preflight

    moe = dict(TINY, num_local_experts=4, intermediate_size_mlp=32, moe_layers=[0])
    est = preflight.estimate_memory(Llama4Config(text_config=Llama4TextConfig(**moe)))
    assert est["params"]["routed_experts"] == 3 * 4 * 16 * 32  # 3 projections x E x H x I
    assert preflight.estimate_memory(LlamaConfig(**TINY))["params"]["routed_experts"] == 0
