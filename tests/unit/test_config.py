"""medtune.settings.config: the three profiles, the libraries' config objects, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from medtune.settings import config as C

PARAMS = Path(__file__).resolve().parents[2] / "params"
PROFILES = ("default", "scout", "smoke")


def write_profile(tmp_path: Path, **changes) -> Path:
    """The default profile with ``changes`` applied at the top level (None removes a key), as a tmp YAML file."""
    data = yaml.safe_load((PARAMS / "default.yaml").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def with_section(section: str, **changes) -> dict:
    data = yaml.safe_load((PARAMS / "default.yaml").read_text(encoding="utf-8"))
    return {**data[section], **changes}


# ---------------------------------------------------------------------------------------------------------------
# The shipped profiles
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PROFILES)
def test_profiles_load_with_their_values(name):
    cfg = C.load(PARAMS / f"{name}.yaml")
    raw = yaml.safe_load((PARAMS / f"{name}.yaml").read_text(encoding="utf-8"))
    assert isinstance(cfg, C.RunConfig)
    assert cfg.profile == name
    assert cfg.heldout_rows == (0, 10)  # a tuple, not the YAML list
    for key, value in raw.items():
        expected = tuple(value) if key == "heldout_rows" else value
        assert getattr(cfg, key) == expected, key
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_profile_values_that_the_walkthrough_fixes():
    scout = C.load(PARAMS / "scout.yaml")
    assert scout.model == "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    assert (scout.max_rows, scout.max_new_tokens, scout.loss_on) == (500, 1200, "text")
    assert scout.lora["r"] == 64 and scout.lora["lora_alpha"] == 16
    smoke = C.load(PARAMS / "smoke.yaml")
    assert smoke.device == "cpu" and smoke.sft["max_steps"] == 4


@pytest.mark.parametrize("name", PROFILES)
def test_bnb_and_lora_configs_build(name):
    cfg = C.load(PARAMS / f"{name}.yaml")
    bnb = C.bnb_config(cfg)
    assert bnb.load_in_4bit is True
    assert bnb.bnb_4bit_quant_type == "nf4"
    assert bnb.bnb_4bit_use_double_quant is False
    expected_dtype = torch.bfloat16 if name == "scout" else torch.float32
    assert bnb.bnb_4bit_compute_dtype == expected_dtype

    lora = C.lora_config(cfg)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (cfg.lora["r"], cfg.lora["lora_alpha"],
                                                            cfg.lora["lora_dropout"])
    assert lora.bias == "none"
    assert str(lora.task_type.value if hasattr(lora.task_type, "value") else lora.task_type) == "CAUSAL_LM"
    targets = cfg.lora["target_modules"]  # a list of names, or one regex string (PEFT takes both)
    if isinstance(targets, str):
        assert lora.target_modules == targets
        assert all(p in targets for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    else:
        assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"}


@pytest.mark.parametrize("name", ("default", "smoke"))
def test_sft_config_builds_for_cpu_profiles(name, tmp_path):
    cfg = C.load(PARAMS / f"{name}.yaml")
    sft = C.sft_config(cfg, tmp_path / "ckpt")
    assert sft.output_dir == str(tmp_path / "ckpt")
    assert sft.completion_only_loss is True  # loss_on: response
    assert sft.seed == 42
    assert sft.learning_rate == pytest.approx(2e-4)
    assert sft.max_length == cfg.sft["max_length"]
    assert sft.bf16 is False


def test_sft_config_scout_needs_bf16_hardware(tmp_path):
    cfg = C.load(PARAMS / "scout.yaml")
    if torch.cuda.is_available():  # a GPU box builds it; both branches assert
        sft = C.sft_config(cfg, tmp_path)
        assert sft.bf16 is True and sft.completion_only_loss is (cfg.loss_on == "response")
        return
    with pytest.raises(C.ConfigError) as err:
        C.sft_config(cfg, tmp_path)
    assert "sft" in str(err.value)
    assert "bf16" in str(err.value)


def test_sft_extra_is_applied_last(tmp_path):
    cfg = C.load(PARAMS / "default.yaml")
    sft = C.sft_config(cfg, tmp_path, learning_rate=1e-3, use_cpu=True)
    assert sft.learning_rate == pytest.approx(1e-3)
    assert sft.use_cpu is True


# ---------------------------------------------------------------------------------------------------------------
# Errors that name the key
# ---------------------------------------------------------------------------------------------------------------

def test_unknown_top_level_key_names_it_and_suggests(tmp_path):
    path = write_profile(tmp_path, max_new_tokns=10)
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    msg = str(err.value)
    assert "'max_new_tokns'" in msg
    assert "Did you mean 'max_new_tokens'" in msg
    assert str(path) in msg


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(C.ConfigError) as err:
        C.from_dict({"zzzzqqq": 1})
    assert "'zzzzqqq'" in str(err.value)
    assert "Did you mean" not in str(err.value)


@pytest.mark.parametrize(
    "section,key,close",
    [("lora", "lora_alpah", "lora_alpha"), ("sft", "learning_rat", "learning_rate"),
     ("quantization", "bnb_4bit_quant_typ", "bnb_4bit_quant_type")],
)
def test_unknown_key_inside_library_section(tmp_path, section, key, close):
    path = write_profile(tmp_path, **{section: with_section(section, **{key: 1})})
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    msg = str(err.value)
    assert f"section '{section}'" in msg
    assert f"'{key}'" in msg
    assert f"Did you mean '{close}'" in msg


def test_output_dir_is_not_settable_in_sft_section():
    with pytest.raises(C.ConfigError) as err:
        C.from_dict({"sft": {"output_dir": "/elsewhere"}})
    assert "section 'sft'" in str(err.value) and "'output_dir'" in str(err.value)


@pytest.mark.parametrize(
    "key,value",
    [("max_new_tokens", "many"), ("heldout_rows", "0,10"), ("seed", True), ("max_new_tokens", 1.5),
     ("heldout_rows", [0, "10"]), ("push", "yes"), ("lora", [1, 2]), ("model", 7), ("max_rows", False)],
)
def test_wrong_type_names_key(tmp_path, key, value):
    path = write_profile(tmp_path, **{key: value})
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    msg = str(err.value)
    assert f"key '{key}'" in msg
    assert repr(value) in msg
    assert str(path) in msg


def test_literal_violation_lists_the_choices():
    with pytest.raises(C.ConfigError) as err:
        C.from_dict({"language": "fr"}, source="params/x.yaml")
    msg = str(err.value)
    assert "params/x.yaml" in msg and "'language'" in msg and "'fr'" in msg
    assert "'en'" in msg and "'zh'" in msg


def test_optional_fields_take_none_and_their_type():
    cfg = C.from_dict({"max_rows": None, "model_revision": "abc123", "hub_repo_id": None})
    assert cfg.max_rows is None and cfg.model_revision == "abc123"
    assert C.from_dict({"max_rows": 50}).max_rows == 50


@pytest.mark.parametrize(
    "data,words",
    [({"heldout_rows": [0, 10, 20], "heldout_size": 2}, ("heldout_rows", "heldout_size", "at least 3")),
     ({"max_new_tokens": 0}, ("max_new_tokens", "at least 1")),
     ({"generation_batch_size": -1}, ("generation_batch_size",)),
     ({"eval_batch_size": 0}, ("eval_batch_size",)),
     ({"heldout_size": 0, "heldout_rows": []}, ("heldout_size",)),
     ({"max_rows": 1}, ("max_rows", "at least 2")),
     ({"heldout_rows": [-1]}, ("heldout_rows", ">= 0"))],
)
def test_impossible_values(data, words):
    with pytest.raises(C.ConfigError) as err:
        C.from_dict(data, source="here")
    for word in words:
        assert word in str(err.value)


def test_duplicate_heldout_rows_count_once():
    cfg = C.from_dict({"heldout_rows": [3, 3], "heldout_size": 1})
    assert cfg.heldout_rows == (3, 3)


def test_not_yaml_file_names_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("profile: x\nlora: [unclosed\n  - {\n", encoding="utf-8")
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    assert str(path) in str(err.value)
    assert "not valid YAML" in str(err.value)


def test_yaml_that_is_not_a_mapping_names_path(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    assert str(path) in str(err.value)
    assert "mapping" in str(err.value) and "list" in str(err.value)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    assert str(path) in str(err.value)
    assert "not found" in str(err.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n"])
def test_empty_profile_is_an_error_not_every_default(tmp_path, text):
    """An empty file would otherwise run as every dataclass default (1200 new tokens, device auto...)."""
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(C.ConfigError,
                       match=r"empty.yaml: the profile is empty\. Start from a copy of params/default.yaml"):
        C.load(path)


def test_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("profile: x\nmax_new_tokens: 24\nseed: 1\nmax_new_tokens: 48\n", encoding="utf-8")
    with pytest.raises(C.ConfigError,
                       match=r"twice.yaml: not valid YAML: .*'max_new_tokens' is given twice \(line 2 and line 4\)"):
        C.load(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text("lora:\n  r: 8\n  r: 16\n", encoding="utf-8")
    with pytest.raises(C.ConfigError, match=r"'r' is given twice \(line 2 and line 3\)"):
        C.load(nested)


def test_non_text_key_is_an_error(tmp_path):
    path = tmp_path / "int.yaml"
    path.write_text("123: y\n", encoding="utf-8")
    with pytest.raises(C.ConfigError, match=r"int.yaml: key 123 is a int; keys are setting names"):
        C.load(path)


@pytest.mark.parametrize("name", ["../../evil", "a b/c", "", "-x", "x" * 65, "run/1"])
def test_profile_name_must_be_safe_in_a_folder_name(name):
    with pytest.raises(C.ConfigError, match=r"'profile' is written into the run folder's name"):
        C.from_dict({"profile": name})


@pytest.mark.parametrize("key", ["model", "dataset"])
def test_empty_model_or_dataset(key):
    with pytest.raises(C.ConfigError, match=rf"'{key}' is empty: give a Hub id"):
        C.from_dict({key: "  "})


def test_push_without_repo_id_fails_at_load_not_in_07():
    with pytest.raises(C.ConfigError,
                       match=r"'push' is true but 'hub_repo_id' is not set, so 07 would fail after training"):
        C.load(PARAMS / "smoke.yaml").replace(push=True)
    assert C.load(PARAMS / "smoke.yaml").replace(push=True, hub_repo_id="me/x").push is True


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("sft", "optim", "adamm", "section 'sft': adamm is not a valid OptimizerNames"),
    ("lora", "r", 0, "'lora.r' must be an integer >= 1"),
    ("lora", "r", -8, "'lora.r' must be an integer >= 1"),
    ("lora", "lora_dropout", 1.5, "'lora.lora_dropout' must be in [0, 1)"),
    ("lora", "lora_alpha", 0, "'lora.lora_alpha' must be > 0"),
    ("lora", "target_modules", "q_proj, k_proj", "PEFT reads a text as one regular expression. Fix: a YAML list"),
    ("sft", "learning_rate", -1.0, "'sft.learning_rate' must be > 0"),
    ("sft", "gradient_accumulation_steps", 0, "'sft.gradient_accumulation_steps' must be an integer >= 1"),
    ("sft", "max_length", 0, "'sft.max_length' must be an integer >= 1, or null"),
    ("sft", "max_steps", 0, "'sft.max_steps' must be an integer >= 1, or -1"),
])
def test_library_values_are_checked_at_load_not_in_05(section, key, value, message):
    """Values the libraries reject, or accept but cannot train with, stop the run when the profile loads (00), not
    in 05 after the model load and the baseline."""
    cfg = C.load(PARAMS / "smoke.yaml")
    with pytest.raises(C.ConfigError) as err:
        cfg.replace(**{section: {**getattr(cfg, section), key: value}})
    assert message in str(err.value)


def test_bf16_on_this_cpu_is_left_to_preflight():
    """The load-time check builds SFTConfig with use_cpu=True: a GPU profile still loads on a CPU box (preflight
    reports bf16 there, with the fix)."""
    assert C.load(PARAMS / "scout.yaml").sft["bf16"] is True


# ---------------------------------------------------------------------------------------------------------------
# Round trip, replace, derived values
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PROFILES)
def test_dump_load_round_trip(tmp_path, name):
    cfg = C.load(PARAMS / f"{name}.yaml").replace(hub_repo_id="me/x", max_rows=7, language="zh")
    out = tmp_path / "config.yaml"
    C.dump(cfg, out)
    back = C.load(out)
    assert back == cfg
    assert back.heldout_rows == (0, 10)
    assert yaml.safe_load(out.read_text(encoding="utf-8"))["heldout_rows"] == [0, 10]


def test_load_applies_overrides_and_ignores_none():
    cfg = C.load(PARAMS / "default.yaml", max_new_tokens=7, seed=None, language="zh")
    assert cfg.max_new_tokens == 7 and cfg.language == "zh"
    assert cfg.seed == 42


def test_replace_ignores_none_and_validates():
    cfg = C.load(PARAMS / "default.yaml")
    same = cfg.replace(max_new_tokens=None, hub_repo_id=None)
    assert same == cfg
    changed = cfg.replace(max_new_tokens=5, heldout_rows=[1, 2])
    assert changed.max_new_tokens == 5 and changed.heldout_rows == (1, 2)
    assert cfg.max_new_tokens == 200  # the original is untouched (frozen)
    with pytest.raises(C.ConfigError, match="key 'max_new_tokens'"):
        cfg.replace(max_new_tokens="5")
    with pytest.raises(C.ConfigError, match="Did you mean 'max_new_tokens'"):
        cfg.replace(max_new_token=5)
    with pytest.raises(C.ConfigError, match="'max_new_tokens' must be at least 1"):
        cfg.replace(max_new_tokens=0)
    with pytest.raises(C.ConfigError, match="section 'lora'"):
        cfg.replace(lora={"rank": 8})


@pytest.mark.parametrize("loss_on,expected", [("response", True), ("text", False)])
def test_loss_on_sets_completion_only_loss(tmp_path, loss_on, expected):
    cfg = C.load(PARAMS / "default.yaml", loss_on=loss_on)
    assert C.sft_config(cfg, tmp_path).completion_only_loss is expected


def test_sft_section_overrides_loss_on(tmp_path):
    cfg = C.load(PARAMS / "default.yaml")
    cfg = cfg.replace(loss_on="response", sft={**cfg.sft, "completion_only_loss": False})
    assert C.sft_config(cfg, tmp_path).completion_only_loss is False


@pytest.mark.parametrize("name,dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("float32", torch.float32), ("float", torch.float32)])
def test_bnb_compute_dtype_string_to_torch(name, dtype):
    cfg = C.load(PARAMS / "default.yaml")
    cfg = cfg.replace(quantization={**cfg.quantization, "bnb_4bit_compute_dtype": name})
    assert C.bnb_config(cfg).bnb_4bit_compute_dtype == dtype
    assert cfg.quantization["bnb_4bit_compute_dtype"] == name  # the config keeps the string (YAML-dumpable)


@pytest.mark.parametrize("bad", ["bfloat17", "Tensor", "tensor", ""])
def test_bnb_bad_dtype_string(bad):
    cfg = C.load(PARAMS / "default.yaml")
    with pytest.raises(C.ConfigError) as err:  # at load: the section is built then (and again in 01)
        cfg.replace(quantization={**cfg.quantization, "bnb_4bit_compute_dtype": bad})
    assert f"'{bad}'" in str(err.value)
    assert "bnb_4bit_compute_dtype" in str(err.value)


def test_empty_quantization_means_no_quantization():
    assert C.bnb_config(C.from_dict({"quantization": {}})) is None


def test_lora_library_rejection_names_section():
    with pytest.raises(C.ConfigError) as err:  # at load: the section is built then (and again in 05)
        C.from_dict({"lora": {"r": 8, "layers_pattern": "layers", "target_modules": ["q_proj"]}})
    assert "section 'lora'" in str(err.value)
    assert "layers_to_transform" in str(err.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("sft", "learning_rate", "1e-4",
         "'sft.learning_rate' must be float, got '1e-4' (str) (YAML reads 1e-4 as text: write 1.0e-4)"),
        ("sft", "max_length", "x", "'sft.max_length' must be int or null, got 'x'"),
        ("sft", "activation_checkpointing", "yes", "'sft.activation_checkpointing' must be bool or null"),
        ("lora", "r", "64", "'lora.r' must be int, got '64' (str) (remove the quotes)"),
    ],
)
def test_library_section_values_are_type_checked_before_any_model_loads(section, key, value, message):
    data = yaml.safe_load((PARAMS / "default.yaml").read_text())
    data[section] = {**data[section], key: value}
    with pytest.raises(C.ConfigError) as err:
        C.from_dict(data, "bad.yaml")
    assert str(err.value).startswith("bad.yaml: ") and message in str(err.value)


@pytest.mark.parametrize(("targets", "message"), [
    (["q_projj", "k_proj"], "'lora.target_modules' ['q_projj'] matches no module of LlamaForCausalLM"),
    (["q_proj", "attn_out"], "['attn_out'] matches no module"),
    (r"nomatch\..*", "matches no module of LlamaForCausalLM"),
])
def test_lora_targets_that_match_no_module_are_named_with_the_models_layers(targets, message):
    """PEFT itself only fails when nothing matches; a typo in one list entry would silently drop that projection."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medtune.stages import modeling

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    cfg = C.load(PARAMS / "smoke.yaml")
    assert modeling.check_lora_targets(cfg, model) == 14  # 7 projections x 2 layers
    with pytest.raises(C.ConfigError) as err:
        modeling.check_lora_targets(cfg.replace(lora={**cfg.lora, "target_modules": targets}), model)
    assert message in str(err.value)
    named = "Linear layers are named: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    assert named in str(err.value)


def test_relative_paths_in_a_profile_mean_the_project_folder_wherever_it_is_loaded(tmp_path, monkeypatch):
    """make runs in the project folder, each notebook's kernel in notebooks/: a relative dataset or benchmark path
    must name the same file in both. Hub ids (owner/name, no such folder) stay as they are."""
    root = Path(__file__).resolve().parents[2]
    profile = tmp_path / "rel.yaml"
    profile.write_text("dataset: medtune/assets/medical_reasoning_illustrative.jsonl\n"
                       "model: HuggingFaceTB/SmolLM2-135M-Instruct\n"
                       "benchmarks:\n  medqa: medtune/assets/mc_medqa_style_illustrative.jsonl\n"
                       "  pubmedqa: {source: qiaojin/PubMedQA, config: pqa_labeled, split: train}\n"
                       "  missing: data/nosuch.jsonl\n", encoding="utf-8")
    for where in (root, root / "notebooks"):
        monkeypatch.chdir(where)
        cfg = C.load(profile)
        assert cfg.dataset == str(root / "medtune" / "assets" / "medical_reasoning_illustrative.jsonl")
        assert cfg.benchmarks["medqa"] == str(root / "medtune" / "assets" / "mc_medqa_style_illustrative.jsonl")
        assert cfg.benchmarks["missing"] == str(root / "data" / "nosuch.jsonl")  # error messages show where it looked
        assert cfg.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert cfg.benchmarks["pubmedqa"]["source"] == "qiaojin/PubMedQA"


def test_yaml_booleans_in_text_settings_are_explained(tmp_path):
    """YAML 1.1 reads an unquoted no/off/false (and yes/on/true) as a boolean: `language: no` arrived as False and was
    reported as "got False (bool)" without saying why."""
    path = tmp_path / "no.yaml"
    path.write_text("profile: mine\nlanguage: no\n", encoding="utf-8")
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    assert str(err.value) == (
        f"{path}: key 'language' must be one of 'en', 'zh', got False (bool); YAML reads an unquoted no (also off, "
        "false) as the boolean false, not as the text 'no' (text in quotes stays text).")
    path.write_text("profile: mine\npush_to: yes\n", encoding="utf-8")
    with pytest.raises(C.ConfigError, match=r"got True \(bool\); YAML reads an unquoted yes \(also on, true\) as the "
                                             r"boolean true, not as the text 'yes'"):
        C.load(path)
    data = yaml.safe_load((PARAMS / "default.yaml").read_text())
    data["sft"] = {**data["sft"], "optim": yaml.safe_load("off")}
    with pytest.raises(C.ConfigError, match=r"'sft.optim' must be .*, got False \(bool\); YAML reads an unquoted no"):
        C.from_dict(data, "bad.yaml")
    with pytest.raises(C.ConfigError, match=r"'benchmarks.cmexam.language' .* got False; YAML reads an unquoted no"):
        C.from_dict({"benchmarks": {"cmexam": {"source": "x.jsonl", "language": False}}}, "bad.yaml")
    path.write_text("profile: mine\nlanguage: 'en'\n", encoding="utf-8")
    assert C.load(path).language == "en"  # quoted text and real booleans are unaffected
    assert C.from_dict({"push": False}).push is False
