"""medtune.stages.preflight: the memory estimate against the H200 measurements, and every check failing the way a user
would meet it (no GPU, a GPU without bf16, no bitsandbytes, gated model, small disk, too little GPU memory, other
library versions), offline: the Hub is the recording fake of tests/helpers.py; free disk and GPU memory are
monkeypatched."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import GatedRepoError

from medtune.io import sources as S
from medtune.llama4 import scout_text_config
from medtune.settings import config as C
from medtune.stages import modeling
from medtune.stages import preflight as P
from medtune.stages.modeling import TOKENIZER_FILES
from tests.helpers import FakeClient, response, use_fake

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params"
SCOUT_ID = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
DATASET_ID = "FreedomIntelligence/medical-o1-reasoning-SFT"
CANARY = "hf_CANARYpreflight" + "w" * 24
GB = 10**9
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False)
LORA = dict(r=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def real_rows_path(shared) -> Path:
    path = shared / "data" / "medical-o1" / "medical_o1_sft_en_604.jsonl"
    if not path.is_file():
        pytest.fail(f"real rows missing: {path} (see shared/data/README.md)", pytrace=False)
    return path


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any real client fails the test; no token unless a test sets one; caches and outputs under tmp_path."""
    def refuse(endpoint):
        raise AssertionError("a real Hub/ModelScope client was created")

    monkeypatch.setitem(S.CLIENTS, "hub", refuse)
    monkeypatch.setitem(S.CLIENTS, "modelscope", refuse)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))


# ---------------------------------------------------------------------------------------------------------------
# The estimate against docs/bench-h200.md (one H200, Scout's text config, LoRA r=64 on 7 projections)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,fast,dq,key,measured", [
    (48, True, False, "weights_gib", 58.7),   # "full 48-layer model, medtune ... weights GiB 58.7"
    (48, True, True, "weights_gib", 54.5),    # same, double quant
    (48, False, False, "layers_gib", 184.0),  # "The walkthrough's 48 layers would hold ~184 GiB of weights"
    (48, True, False, "total_gib", 67.4),     # peak, 4,096 tokens
    (48, True, True, "total_gib", 62.8),
    (3, True, False, "total_gib", 11.4),      # "3-layer peak GiB", medtune, 4,096 tokens
    (3, False, False, "total_gib", 23.0),     # same, walkthrough (dense dispatch, bf16 experts)
])
def test_estimate_within_10_percent_of_the_h200_measurements(layers, fast, dq, key, measured):
    est = P.estimate_memory(scout_text_config(num_hidden_layers=layers),
                            quantization={**NF4, "bnb_4bit_use_double_quant": dq},
                            llama4_fast=fast, lora=LORA, tokens=4096, checkpointing=True)
    assert abs(est[key] - measured) / measured < 0.10, (key, est[key], measured)


def test_estimate_counts_parameters_by_kind():
    est = P.estimate_memory(scout_text_config(), quantization=NF4, lora=LORA)
    p = est["params"]
    assert p["lora"] == 48 * 4_653_056  # FIELD-NOTES.md: LoRA r=64 on those targets, per layer
    assert p["routed_experts"] == 48 * 16 * 3 * 5120 * 8192  # ~96.6B in fused 3-D experts
    assert abs(sum(p.values()) - p["lora"] - 108.6e9) / 108.6e9 < 0.01  # Scout's text model: ~109B parameters
    assert p["embeddings"] == p["lm_head"] == 202048 * 5120
    # the embedded default (SmolLM2-135M, tied embeddings): 134.5M parameters, 19,537,920 LoRA parameters
    from transformers import LlamaConfig

    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    q = P.estimate_memory(smol, quantization=NF4, lora=LORA)["params"]
    assert q["lm_head"] == 0 and q["lora"] == 19_537_920
    assert abs(sum(q.values()) - q["lora"] - 134.5e6) / 134.5e6 < 0.01


def test_estimate_counts_routed_expert_lora_at_its_rank_pattern():
    # params/scout.yaml's commented example: r=16 on the routed experts' gate_up/down, the rest at r=64.
    experts = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
    base = P.estimate_memory(scout_text_config(), quantization=NF4, lora=LORA)["params"]["lora"]
    pattern = {**LORA, "lora_dropout": 0.0, "target_parameters": experts,
               "rank_pattern": {r"feed_forward\.experts\.(gate_up|down)_proj": 16}}
    est = P.estimate_memory(scout_text_config(), quantization=NF4, lora=pattern)
    assert est["params"]["lora"] - base == 427_819_008  # 48 x 8,912,896 (medtune/llama4/expert_lora.py)
    flat = P.estimate_memory(scout_text_config(), quantization=NF4, lora={**pattern, "rank_pattern": {}})
    assert flat["params"]["lora"] - base == 4 * 427_819_008  # the experts at r=64 without the pattern


# ---------------------------------------------------------------------------------------------------------------
# The offline default
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "smoke"])
def test_default_profiles_pass_offline(name, capsys):
    start = time.perf_counter()
    report = P.run(C.load(PARAMS / f"{name}.yaml"))  # no client is created (no_network)
    assert report["ok"] is True
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["settings"] == status["access"] == "ok" and status["disk"] == "ok"
    assert status["push"] == "ok" and status["benchmarks"] == "ok"  # dry run; shipped MC files read in full
    assert status["versions"] in ("ok", "warning")  # a warning never fails the run
    out = capsys.readouterr().out
    assert "OK    access: model and dataset are local" in out
    disk = next(c["detail"] for c in report["checks"] if c["name"] == "disk")
    # SmolLM2-135M merged in bf16: ~135M parameters x 2 B
    assert ("merged model (export_merged) 0.3 GB" in disk) is C.load(PARAMS / f"{name}.yaml").export_merged
    assert time.perf_counter() - start < 30  # seconds, on a busy 2-core machine; ~1 s once imports are warm


def test_push_without_its_token_fails_in_00_not_after_training(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    cfg = C.load(PARAMS / "smoke.yaml").replace(push=True, hub_repo_id="me/medtune-test")
    with pytest.raises(P.PreflightError) as err:
        P.run(cfg)
    msg = str(err.value)
    assert "push: true to hub (me/medtune-test), but HF_TOKEN is not set" in msg and "write access" in msg
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-" + "x" * 30)
    check = P.check_push(cfg.replace(push_to="modelscope"))
    assert check.status == "ok" and "MODELSCOPE_API_TOKEN is set" in check.detail


def test_bad_benchmark_file_fails_in_00_not_in_04(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"question": "q?", "choices": null, "answer": "A"}\n', encoding="utf-8")
    cfg = C.load(PARAMS / "smoke.yaml").replace(benchmarks={"medqa": str(bad)})
    with pytest.raises(P.PreflightError) as err:
        P.run(cfg)
    assert f"benchmarks.medqa: {bad} line 1: 'choices' is null" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Scout on a machine that cannot run it: every failure in one error
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def scout_hub(monkeypatch, tmp_path, shared):
    """The fake Hub serving Scout as its file metadata describes it: config.json (Scout's real dimensions), the real
    Llama 4 tokenizer files and 50 safetensors shards totalling 217.8 GB (sparse files: no disk used); and the
    dataset repo with its card and, as its `en` data file, the 604 real rows of ../shared."""
    from transformers import Llama4Config

    repo = tmp_path / "scout"
    repo.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared / "tokenizers" / "llama4" / name, repo / name)
    text = scout_text_config().to_dict()
    (repo / "config.json").write_text(Llama4Config(text_config=text).to_json_string())
    for i in range(1, 51):
        with open(repo / f"model-{i:05d}-of-00050.safetensors", "wb") as fh:
            fh.truncate(4_356_000_000)
    (repo / "original").mkdir()
    with open(repo / "original" / "consolidated.00.pth", "wb") as fh:  # Meta's copy: never counted
        fh.truncate(200 * GB)
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files: a.json\n---\n")
    shutil.copy(shared / "data" / "medical-o1" / "medical_o1_sft_en_604.jsonl", ds / "a.json")  # JSON lines
    fake = FakeClient(tmp_path / "cache", repos={("model", SCOUT_ID): repo, ("dataset", DATASET_ID): ds})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "medtune-cache"))
    return use_fake(monkeypatch, fake)


def fake_disk(monkeypatch, free_gb: float):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(P.shutil, "disk_usage", lambda path: usage._replace(free=int(free_gb * GB)))


def fake_gpus(monkeypatch, free_gib: list[float], bf16: bool = True, name: str = "NVIDIA H200"):
    import bitsandbytes  # noqa: F401 - before torch.cuda is faked: on import it picks its CUDA or CPU backend
    import transformers  # noqa: F401

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free_gib))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (int(free_gib[i] * 2**30), int(139.8 * 2**30)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(P, "_check_bitsandbytes", lambda cfg, gpu: [])  # this machine's bitsandbytes has no CUDA


def test_scout_on_a_cpu_box_with_a_small_disk_fails_once_listing_everything(scout_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    fake_disk(monkeypatch, free_gb=120)
    with pytest.raises(P.PreflightError) as err:
        P.run(C.load(PARAMS / "scout.yaml"))
    msg = str(err.value)
    assert msg.startswith("preflight: 3 checks failed; nothing was downloaded or loaded.")
    names = [c.name for c in err.value.failed]
    assert names == ["sft.bf16", "memory", "disk"]
    assert "sft.bf16 is true, but torch sees no GPU" in msg and "bf16: false" in msg and "params/default.yaml" in msg
    assert "training needs ~" in msg and "system RAM" in msg and "use a GPU machine" in msg
    # download: 50 shards = 217.8 GB (config.json and the 2 tokenizer files are already cached; Meta's original/
    # copy is never downloaded),
    # the NF4 experts cache (96.6B weights x 0.5625 B = 54.4 GB) and the checkpoints, all on one disk here
    assert "model download (50 of 53 files) 217.8 GB" in msg and "NF4 experts cache 54.4 GB" in msg
    # checkpoints: 240 steps / save_steps 50 = 5, at most save_total_limit 2 + 1 on disk at once, + the adapter:
    # 4 x 223.3M LoRA parameters x 12 B = 10.7 GB
    assert "checkpoints + adapter 10.7 GB at " in msg and "282.9 GB needed, 120.0 GB free" in msg
    assert "free 162.9 GB more" in msg and "HF_HOME" in msg
    assert CANARY not in msg
    downloads = [(c["repo_type"], c["allow_patterns"]) for m, c in scout_hub.calls
                 if m == "snapshot_download" and not c["local_files_only"]]
    # nothing large was fetched: the tokenizer files, the dataset's card and its en file, the model's config.json
    assert downloads == [("model", TOKENIZER_FILES), ("dataset", ["README.md"]), ("dataset", ["README.md", "a.json"]),
                         ("model", ["config.json"])]
    # the dataset was read and split, and its tokens counted with Scout's tokenizer, in 00
    dataset = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("OK    dataset:"))
    assert dataset == (f"OK    dataset: {DATASET_ID}: 500 usable rows of 500 read, 480 to train and 20 held out; "
                       "training texts 403-1,061 tokens (sft.max_length 2,048).")


def test_scout_on_one_h200_passes_and_records_the_estimate(scout_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    fake_disk(monkeypatch, free_gb=400)
    fake_gpus(monkeypatch, [139.0])
    report = P.run(C.load(PARAMS / "scout.yaml"))
    est = report["estimate"]
    assert 55 < est["weights_gib"] < 62 and est["total_gib"] < 139  # NF4 experts: fits one H200
    assert CANARY not in json.dumps(report)


def test_walkthrough_path_on_one_h200_names_the_fix(scout_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    fake_disk(monkeypatch, free_gb=400)
    fake_gpus(monkeypatch, [139.0])
    cfg = C.load(PARAMS / "scout.yaml").replace(llama4_fast=False)
    with pytest.raises(P.PreflightError) as err:
        P.run(cfg)
    assert [c.name for c in err.value.failed] == ["memory"]
    msg = str(err.value)
    assert "weights 188.6" in msg and "free: 139.0 GiB on GPU 0" in msg
    assert "set llama4_fast: true" in msg and "3x H200" in msg
    fake_gpus(monkeypatch, [139.0, 139.0])  # device_map="auto" spreads it: 278 GiB together
    report = P.run(cfg)
    assert report["ok"] is True and 190 < report["estimate"]["total_gib"] < 278
    assert "on 2 GPUs together" in next(c["detail"] for c in report["checks"] if c["name"] == "memory")


def test_gated_model_without_access_is_reported_and_nothing_else_is_tried(scout_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    fake_gpus(monkeypatch, [139.0])
    scout_hub.errors["auth_check"] = GatedRepoError(f"gated, token {CANARY}", response=response(403))
    with pytest.raises(P.PreflightError) as err:
        P.run(C.load(PARAMS / "scout.yaml"))
    assert [c.name for c in err.value.failed] == ["access"]
    msg = str(err.value)
    assert "no access to the gated model" in msg and "accept the license" in msg and CANARY not in msg
    assert "snapshot_download" not in scout_hub.methods()  # no config, no listing for disk: access first


def test_token_missing_for_a_gated_model(scout_hub, monkeypatch):
    fake_gpus(monkeypatch, [139.0])
    scout_hub.errors["auth_check"] = GatedRepoError("gated", response=response(401))
    with pytest.raises(P.PreflightError) as err:
        P.run(C.load(PARAMS / "scout.yaml"))
    assert "[access]" in str(err.value) and "HF_TOKEN is not set" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Settings this machine cannot run
# ---------------------------------------------------------------------------------------------------------------

def test_bf16_without_a_gpu_names_the_key_and_the_fix():
    cfg = C.load(PARAMS / "smoke.yaml")
    sft = {k: v for k, v in cfg.sft.items() if k != "bf16"}
    for c, said in ((cfg.replace(sft={**sft, "bf16": True}), "sft.bf16 is true"),
                    (C.from_dict({**cfg.to_dict(), "sft": sft}), "sft.bf16 is not set (TRL then trains in bf16)")):
        (check,) = [c for c in P.check_settings(c) if c.status == "error"]
        assert check.name == "sft.bf16" and said in check.detail and "bf16: false" in check.fix
    (check,) = [c for c in P.check_settings(cfg.replace(sft={**cfg.sft, "fp16": True})) if c.status == "error"]
    assert check.name == "sft.fp16" and "fp16: false" in check.fix


def test_bf16_on_a_gpu_without_bf16(monkeypatch):
    fake_gpus(monkeypatch, [15.0], bf16=False, name="Tesla T4")
    cfg = C.load(PARAMS / "scout.yaml")
    (check,) = [c for c in P.check_settings(cfg) if c.status == "error"]
    assert check.name == "sft.bf16" and "Tesla T4" in check.detail and "fp16: true" in check.fix


def test_4bit_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    (check,) = [c for c in P.check_settings(C.load(PARAMS / "smoke.yaml")) if c.status == "error"]
    assert check.name == "quantization.load_in_4bit" and "does not import" in check.detail
    assert "bitsandbytes==0.50.2" in check.fix and "quantization: {}" in check.fix


def test_4bit_on_a_device_bitsandbytes_cannot_run(monkeypatch):
    import bitsandbytes.functional as F

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(F, "quantize_4bit", unsupported)
    (check,) = [c for c in P.check_settings(C.load(PARAMS / "smoke.yaml")) if c.status == "error"]
    assert check.name == "quantization.load_in_4bit" and "cannot quantize on cpu" in check.detail
    assert "no kernel for this device" in check.detail


def test_4bit_works_here():
    """The probe itself: bitsandbytes 0.50.2 quantizes NF4 on this CPU (FIELD-NOTES.md)."""
    assert P._check_bitsandbytes(C.load(PARAMS / "smoke.yaml"), gpu=False) == []


def test_device_cuda_without_gpu():
    checks = P.check_settings(C.load(PARAMS / "smoke.yaml").replace(device="cuda"))
    assert any(c.name == "device" and c.status == "error" and "device: auto" in c.fix for c in checks)


# ---------------------------------------------------------------------------------------------------------------
# Library versions: a warning, never a crash
# ---------------------------------------------------------------------------------------------------------------

def test_versions_other_than_tested_are_a_warning(tmp_path, monkeypatch, capsys):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "medtune"\ndependencies = ["torch==0.0.1", "pyyaml>=6", '
                         '"no-such-package-medtune==1.0"]\n[project.optional-dependencies]\n'
                         'lab = ["another-missing-package==2.0"]\n')
    check = P.check_versions(pyproject)
    assert check.status == "warning"
    assert f"torch {torch.__version__} (tested 0.0.1)" in check.detail
    assert "no-such-package-medtune not installed (tested 1.0)" in check.detail
    assert "another-missing-package" not in check.detail  # optional and not installed: not a requirement
    assert "make env" in check.fix
    monkeypatch.setattr(P, "check_versions", lambda: check)
    assert P.run(C.load(PARAMS / "smoke.yaml"))["ok"] is True  # warned, did not fail
    out = capsys.readouterr().out
    assert "WARN  versions: not the tested versions:" in out and "(tested 0.0.1)" in out


def test_tested_versions_are_the_pyproject_pins():
    pins = P.tested_versions(ROOT / "pyproject.toml")
    assert pins["transformers"] == "5.23.0" and pins["trl"] == "1.16.0" and pins["bitsandbytes"] == "0.50.2"
    assert P.check_versions(ROOT / "pyproject.toml").status == "ok"  # this environment is the tested set


# ---------------------------------------------------------------------------------------------------------------
# Where it runs: 00 and 01, before any download
# ---------------------------------------------------------------------------------------------------------------

def test_notebooks_00_and_01_run_preflight_before_the_model_loads():
    import nbformat

    nb00 = [c.source for c in nbformat.read(ROOT / "notebooks" / "00_authenticate.ipynb", as_version=4).cells]
    assert any("preflight.run(cfg, access=status)" in s for s in nb00)
    nb01 = [c.source for c in nbformat.read(ROOT / "notebooks" / "01_load_quantized_model.ipynb", as_version=4).cells
            if c.cell_type == "code"]
    first = next(i for i, s in enumerate(nb01) if "preflight.run(cfg, rows=False)" in s)
    load = next(i for i, s in enumerate(nb01) if "modeling.load_model(cfg)" in s)
    assert first < load
    assert 'run.record("preflight", checks)' in nb01[-2]
    assert nb01[-1] == 'run.record_resources("01_load_quantized_model");'  # the last cell: time and peak memory


def test_checkpoint_estimate_counts_the_rows_of_a_local_dataset():
    """The default profile (64 shipped rows, 8 held out, 2 sequences per step: 28 steps, save_steps 10) writes 3
    checkpoints; measured 2026-12-01: 228 MiB each (LoRA fp32 + AdamW states) plus the 75 MiB adapter. The estimate
    counted one checkpoint before, since max_rows is null there."""
    cfg = C.load(PARAMS / "default.yaml")
    assert P._local_row_count(cfg.dataset) == 64
    estimate = P._checkpoint_bytes(cfg, 19_537_920)
    assert estimate == (3 + 1) * 19_537_920 * 12
    measured = 3 * 228 * 2**20 + 75 * 2**20
    assert abs(estimate - measured) / measured < 0.25


def test_malformed_token_fails_in_00_even_when_the_run_needs_none(monkeypatch):
    """A line break pasted into HF_TOKEN made 01 fail after 00 had said OK (the smoke run needs no token)."""
    canary = "hf_" + "Zz9" * 10
    monkeypatch.setenv("HF_TOKEN", canary + "\n" + canary)
    with pytest.raises(P.PreflightError) as err:
        P.run(C.load(PARAMS / "smoke.yaml"))
    assert "[tokens] HF_TOKEN holds a space or line break inside the token" in str(err.value)
    assert canary not in str(err.value)


@pytest.mark.parametrize(("content", "words"), [
    ('{"Question": "\\ud800 x", "Complex_CoT": "c", "Response": "r"}\n'
     '{"Question": "q2", "Complex_CoT": "c", "Response": "r"}\n',
     "line 1: field 'Question' is not valid Unicode"),
    (b"\xff\xfe" + '{"Question": "q"}\n'.encode("utf-16-le"), "the file is UTF-16 encoded"),
    ("", "rows.jsonl"),
])
def test_broken_local_dataset_fails_in_00_before_01_loads_the_model(tmp_path, content, words):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    check = P.check_dataset_file(C.load(PARAMS / "smoke.yaml").replace(dataset=str(path), max_rows=None))
    assert check.status == "error" and words in check.detail


def test_shipped_dataset_passes_the_00_check():
    cfg = C.load(PARAMS / "default.yaml")
    assert P.check_dataset_file(cfg) == P.Check(
        "dataset", "ok", "medical_reasoning_illustrative.jsonl: 64 usable rows of 64 read, 56 to train and 8 held out; "
        "token lengths checked in 03.")
    check = P.check_dataset_file(cfg, modeling.profile_tokenizer(cfg))  # SmolLM2's, read from the GGUF or 01's copy
    assert (check.status, check.detail) == (
        "ok", "medical_reasoning_illustrative.jsonl: 64 usable rows of 64 read, 56 to train and 8 held out; training "
              "texts 308-403 tokens (sft.max_length 1,024).")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return modeling.profile_tokenizer(C.load(PARAMS / "default.yaml"))


SMOLLM2_OVER_1024 = [(93, 1111), (130, 1076), (169, 1083), (171, 1138), (212, 1055), (217, 1029), (261, 1071),
                     (278, 1053), (280, 1046), (309, 1098), (391, 1026), (550, 1371), (556, 1051), (560, 1091),
                     (585, 1046), (589, 1260), (600, 1159)]


def test_real_rows_longer_than_max_length_stop_00_with_each_row_and_the_fixes(real_rows_path, smollm2_tokenizer):
    """The 604 real rows with the default profile's tokenizer (SmolLM2) run to 1,371 tokens; 17 are over its
    sft.max_length 1,024. Before, 03 found them, after 01 had loaded the model; now 00 lists each with its length."""
    cfg = C.load(PARAMS / "default.yaml").replace(dataset=str(real_rows_path))
    check = P.check_dataset_file(cfg, smollm2_tokenizer)
    assert check.status == "error"
    lines = check.detail.splitlines()
    assert lines[0] == f"{real_rows_path}: 17 of 604 rows cannot be used (bad_rows: fail), by line number:"
    assert lines[1:18] == [f"  line {n}: {t:,} tokens, longer than sft.max_length 1,024 (truncation would cut the "
                           "answer and the EOS)" for n, t in SMOLLM2_OVER_1024]
    assert lines[18] == (
        "Fix them in the data, or set bad_rows: skip in the profile to leave them out (each skipped row is then listed "
        "in 03 and in the run's data/skipped_rows.jsonl), or raise sft.max_length to at least 1,371 (the longest row; "
        "more memory per step).")
    skip = P.check_dataset_file(cfg.replace(bad_rows="skip"), smollm2_tokenizer)
    listed = ", ".join(f"line {n} ({t:,} tokens)" for n, t in SMOLLM2_OVER_1024[:10])
    assert (skip.status, skip.detail) == (
        "ok", f"medical_o1_sft_en_604.jsonl: 587 usable rows of 604 read, 579 to train and 8 held out; training texts "
              f"427-1,371 tokens (sft.max_length 1,024); 17 bad rows to skip (bad_rows: skip; all listed in 03), 17 of "
              f"them longer than sft.max_length: {listed} and 7 more.")
    raised = P.check_dataset_file(cfg.replace(sft={**cfg.sft, "max_length": 1371}), smollm2_tokenizer)
    assert raised.status == "ok" and "604 usable rows of 604 read" in raised.detail


def test_real_rows_with_the_llama4_tokenizer(real_rows_path, shared):
    """The same rows with the real Llama 4 tokenizer (a local model folder holding only the tokenizer): 403-1,251
    tokens; at sft.max_length 1,024, 6 rows are over, at scout.yaml's 2,048 none."""
    base = C.load(PARAMS / "default.yaml")
    cfg = base.replace(dataset=str(real_rows_path), model=str(shared / "tokenizers" / "llama4"),
                       sft={**base.sft, "max_length": 1024})
    tokenizer = modeling.profile_tokenizer(cfg)
    assert tokenizer.eos_token == "<|eot|>"
    check = P.check_dataset_file(cfg, tokenizer)
    assert check.status == "error" and "6 of 604 rows cannot be used" in check.detail
    assert [line.split(":")[0].strip() for line in check.detail.splitlines()[1:7]] == [
        "line 93", "line 169", "line 550", "line 560", "line 589", "line 600"]
    assert "line 550: 1,251 tokens" in check.detail and "at least 1,251" in check.detail
    ok = P.check_dataset_file(cfg.replace(sft={**cfg.sft, "max_length": 2048}), tokenizer)
    assert ok.detail.endswith("604 usable rows of 604 read, 596 to train and 8 held out; training texts 403-1,251 "
                              "tokens (sft.max_length 2,048).")


@pytest.mark.parametrize(("changes", "message"), [
    ({"max_rows": 500, "heldout_size": 500, "max_length": 1400},
     "heldout_size 500 leaves no training rows: 500 usable rows (500 read with max_rows: 500). Set heldout_size below "
     "500, or raise max_rows."),
    ({"max_rows": 500, "heldout_size": 20, "heldout_rows": [0, 510], "max_length": 1400},
     "heldout_rows [510] is past the 500 rows read with max_rows: 500; heldout_rows are 0-based row indices: use "
     "indices below 500, or raise max_rows."),
    ({"heldout_size": 600, "bad_rows": "skip", "max_length": 1024},
     "heldout_size 600 leaves no training rows: 587 usable rows (604 read, 17 of them skipped as bad rows). Set "
     "heldout_size below 587."),
])
def test_impossible_split_stops_00_not_03(real_rows_path, smollm2_tokenizer, changes, message):
    """Split values that 03 would refuse after 01 loaded the model (for Scout: after the 217 GB load) stop 00."""
    base, changes = C.load(PARAMS / "default.yaml"), dict(changes)
    sft = {**base.sft, "max_length": changes.pop("max_length")}
    cfg = base.replace(dataset=str(real_rows_path), sft=sft, **changes)
    assert P.check_dataset_file(cfg, smollm2_tokenizer) == P.Check("dataset", "error", message)


def test_lower_case_fields_stop_00_with_the_mapping(real_rows_path, tmp_path):
    lower = {"Question": "question", "Complex_CoT": "complex_cot", "Response": "response"}
    path = tmp_path / "lower.jsonl"
    path.write_text("".join(json.dumps({lower[k]: v for k, v in json.loads(line).items()}) + "\n"
                            for line in real_rows_path.read_text(encoding="utf-8").splitlines()), encoding="utf-8")
    cfg = C.load(PARAMS / "default.yaml").replace(dataset=str(path), bad_rows="skip")
    check = P.check_dataset_file(cfg)
    assert check.status == "error" and check.detail.endswith(
        "map them in the profile:\n  columns: {Question: question, Complex_CoT: complex_cot, Response: response}")
    ok = P.check_dataset_file(cfg.replace(columns=lower))
    assert ok.status == "ok" and ok.detail.startswith("lower.jsonl: 604 usable rows of 604 read, 596 to train")


def test_preflight_run_reads_rows_with_the_profile_tokenizer(monkeypatch):
    """P.run (00) checks the split with the profile's tokenizer and stops before any model loads; 01 passes
    rows=False (00 did it)."""
    loaded = []
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: loaded.append(a))
    cfg = C.load(PARAMS / "smoke.yaml").replace(heldout_size=16)
    with pytest.raises(P.PreflightError) as err:
        P.run(cfg)
    assert [c.name for c in err.value.failed] == ["dataset"]
    assert ("[dataset] heldout_size 16 leaves no training rows: 16 usable rows (16 read with max_rows: 16). Set "
            "heldout_size below 16, or raise max_rows.") in str(err.value)
    names = [c["name"] for c in P.run(cfg, rows=False)["checks"]]
    assert "dataset" not in names and not loaded


def test_pins_are_read_as_pep508_requirements(tmp_path):
    """tested_versions/check_versions parse with ``packaging``: only exact ``==`` pins without a marker count; an
    installed local build (``2.13.0+cpu``) and a zero-padded pin (``==2.13``) match as PEP 440 says."""
    import importlib.metadata

    torch_version = importlib.metadata.version("torch")
    release = torch_version.split("+")[0]
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "medtune"\ndependencies = ["torch[extra]==' + release + '", '
                         '"pyyaml>=6", "marked==1.0; python_version < \'3\'", "ranged==1.0,<2", '
                         '"not a requirement!"]\n')
    assert P.tested_versions(pyproject) == {"torch": release}
    assert P.check_versions(pyproject).status == "ok"
    padded = ".".join(release.split(".")[:2]) if release.endswith(".0") else release
    pyproject.write_text(f'[project]\nname = "medtune"\ndependencies = ["torch=={padded}"]\n')
    assert P.check_versions(pyproject).status == "ok"


def test_packing_longer_than_scouts_nope_floor_scale_fails_in_00(scout_hub, monkeypatch):
    # Scout's NoPE layers scale attention by the position in the whole packed sequence from 8,192 tokens on
    # (medtune.llama4.check_packing): a pack that long would mix rows, so 00 refuses it before the download.
    monkeypatch.setenv("HF_TOKEN", CANARY)
    fake_disk(monkeypatch, free_gb=400)
    fake_gpus(monkeypatch, [139.0])
    cfg = C.load(PARAMS / "scout.yaml")
    with pytest.raises(P.PreflightError) as err:
        P.run(cfg.replace(sft={**cfg.sft, "packing": True, "max_length": 16384}))
    assert [c.name for c in err.value.failed] == ["sft.packing"]
    msg = str(err.value)
    assert "sft.max_length 16384" in msg and "floor_scale 8192" in msg
    assert "Fix: Set sft.max_length to at most 8191" in msg
    report = P.run(cfg.replace(sft={**cfg.sft, "packing": True, "max_length": 4096}))
    check = next(c for c in report["checks"] if c["name"] == "sft.packing")
    assert check["status"] == "ok" and "up to 4096 tokens" in check["detail"]
    assert not any(c["name"] == "sft.packing" for c in P.run(cfg)["checks"])  # no packing, no check
