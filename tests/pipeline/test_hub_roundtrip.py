"""Round trip on the smoke profile (SmolLM2-135M, CPU): the folder notebook 07 writes, loaded onto the base model as
its model card says, reproduces notebook 06's greedy answers token for token; pushed through the seam and
downloaded back it is the same folder; and the merged bf16 export behaves like base + adapter.

One smoke run is built in-process (load -> prepare -> 4 LoRA steps -> 06's answers) and shared by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medtune.evaluation import heldout
from medtune.io import sources as S
from medtune.settings import config
from medtune.settings.runs import RunDir
from medtune.stages import data, modeling, publish, train
from tests.helpers import FakeClient, use_fake

ROOT = Path(__file__).resolve().parents[2]
CANARY = "hf_CANARYroundtrip" + "R" * 24


class RecordGenerate:
    """Wraps ``model.generate`` to keep the token ids it returns (prompt + new tokens, per batch)."""

    def __init__(self, model):
        self.model, self.real, self.outputs = model, model.generate, []
        model.generate = self

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        self.outputs.append(out.tolist())
        return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A smoke run through 06, in this process: ``(cfg, run, the token ids 06's generate returned)``.

    Smaller than the smoke profile where it costs time and proves nothing more: 2 optimizer steps (LoRA's B starts
    at zero, so any step makes the adapter change the answers), 2 held-out questions generated together (left
    padding), 16 new tokens each. max_length stays the smoke profile's 512: the shipped rows are 329-384 SmolLM2
    tokens, and 03 refuses rows longer than sft.max_length.
    """
    root = tmp_path_factory.mktemp("roundtrip")
    cfg = config.load(ROOT / "params" / "smoke.yaml").replace(
        hub_repo_id="me/smollm2-medical-lora", heldout_size=2, generation_batch_size=2, max_new_tokens=16,
        sft={**config.load(ROOT / "params" / "smoke.yaml").sft, "max_steps": 2, "save_steps": 100})
    run = RunDir.create(cfg, root=root / "outputs")
    model, tok = modeling.load_model(cfg)  # 01
    run.record("data", {k: v for k, v in data.prepare(cfg, run, tok).items() if k != "first_text"})  # 03
    trainer = train.build_trainer(cfg, run, model, tok)  # 05
    run.record("train", train.train(trainer, run))
    del trainer, model
    model, tok = modeling.load_model(cfg, adapter=run.adapter_dir)  # 06, as the notebook loads it
    recorded = RecordGenerate(model)
    answers = heldout.answer_heldout(cfg, run, model, tok, run.finetuned_path)
    run.record("finetuned", heldout.summarize(answers))
    del model
    return cfg, run, recorded.outputs


@pytest.mark.slow
def test_push_folder_loads_as_the_card_says_and_reproduces_06(smoke_run, monkeypatch, capsys):
    cfg, run, ids_06 = smoke_run
    monkeypatch.setenv("HF_TOKEN", CANARY)
    result = publish.push(cfg, run)  # 07's dry run: the folder that would be uploaded
    assert result["dry_run"] is True and (run.push_dir / "adapter_model.safetensors").is_file()
    card = publish.card(run)
    assert "| answers generated |  | 2 |  |" in card and "2 optimizer steps" in card
    # what ran on this CPU, not only what the profile asked for
    assert 'ran with `optim="adamw_torch"` (paged_adamw_32bit needs CUDA)' in card
    # The card's usage snippet, run as written, with the Hub ids pointed at local copies (no network here):
    # BASE -> the converted SmolLM2 folder the run trained on, ADAPTER -> the push folder.
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    base_id = publish.base_model(cfg)["id"]
    assert f'BASE = "{base_id}"' in code and 'ADAPTER = "me/smollm2-medical-lora"' in code
    code = code.replace(f'"{base_id}"', repr(modeling.resolve_model(cfg)))
    code = code.replace('"me/smollm2-medical-lora"', repr(str(run.push_dir)))
    scope: dict = {}
    exec(compile(code, "model-card-usage", "exec"), scope)  # noqa: S102 -- the card we generated
    snippet_out = capsys.readouterr().out
    assert snippet_out.strip(), "the snippet printed no answer"

    model, tokenizer = scope["model"], scope["tokenizer"]
    _, heldout_rows = data.read_split(run)
    recorded = RecordGenerate(model)
    again = heldout.generate_answers(model, tokenizer, heldout_rows, language=cfg.language,
                                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size)
    assert recorded.outputs == ids_06  # token for token, padding included
    assert again == data.read_jsonl(run.finetuned_path)  # 06's answers file, field for field
    assert all(a["new_tokens"] > 0 for a in again)
    for path in run.push_dir.rglob("*"):
        assert CANARY.encode() not in path.read_bytes()


@pytest.mark.slow
def test_pushed_and_downloaded_back_is_the_same_folder(smoke_run, monkeypatch, tmp_path):
    cfg, run, _ = smoke_run
    monkeypatch.setenv("HF_TOKEN", CANARY)
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "remote"))
    result = publish.push(cfg.replace(push=True), run)
    assert result["url"].endswith("/me/smollm2-medical-lora/commit/1")
    back = S.get("hub").download("me/smollm2-medical-lora")
    local = {p.relative_to(run.push_dir).as_posix(): p.read_bytes() for p in run.push_dir.rglob("*") if p.is_file()}
    remote = {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*") if p.is_file()}
    assert remote == local
    assert json.loads(local["adapter_config.json"])["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert [m for m, _ in fake.calls] == ["create_repo", "upload_folder", "files", "snapshot_download"]


@pytest.mark.slow
def test_merged_export_is_bf16_base_plus_adapter(smoke_run, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, run, _ = smoke_run
    off = publish.export_merged(cfg, run)  # smoke profile: off, only the plan
    assert off["exported"] is False and not publish.merged_dir(run).exists()
    plan_line = capsys.readouterr().out
    assert "0.135 B parameters" in plan_line and "GiB bf16 on disk" in plan_line and "GiB of RAM" in plan_line
    assert 0.24 < off["disk_gib"] < 0.27  # 134.5M parameters x 2 bytes

    done = publish.export_merged(cfg.replace(export_merged=True), run)
    out = publish.merged_dir(run)
    assert done["exported"] is True and {"config.json", "model.safetensors", "tokenizer.json"} <= set(done["files"])
    assert capsys.readouterr().out.index("merged export:") < 5  # the needs are stated before anything else
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    base = AutoModelForCausalLM.from_pretrained(modeling.resolve_model(cfg), dtype=torch.bfloat16)
    q = "model.layers.0.self_attn.q_proj.weight"
    base_q = base.state_dict()[q].clone()
    unmerged = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    tok = AutoTokenizer.from_pretrained(out)
    _, heldout_rows = data.read_split(run)
    enc = tok(data.test_prompt(heldout_rows[0]["Question"]) + heldout_rows[0]["Complex_CoT"][:400], return_tensors="pt")
    with torch.no_grad():
        a = merged(**enc).logits.float()
        b = unmerged(**enc).logits.float()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert top1 > 0.95, top1  # bf16 rounding of W + BA may flip a near-tie, not more
    assert (a - b).abs().mean().item() < 0.05 * b.abs().mean().item()
    assert not torch.equal(merged.state_dict()[q], base_q)  # the update is in the weights
