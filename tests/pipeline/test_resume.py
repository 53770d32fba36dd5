"""Resume after interruption: SFT checkpoints every ``sft.save_steps`` into the run; a training process killed with
SIGKILL part-way and started again continues from its last complete checkpoint and ends with the same adapter as
an uninterrupted run with the same seed.

The training runs in subprocesses through medtune's own calls (config.load, RunDir, modeling.load_model,
data.prepare, train.build_trainer, train.train), on the smoke profile with a tiny random Llama (2 layers, hidden 64,
SmolLM2's tokenizer) and short rows, so that three trainings fit in about a minute on 2 CPU cores. Everything
else is the smoke profile's: NF4 4-bit Linears, LoRA r=64 with dropout 0.05 on the seven projections, TRL's
SFTTrainer, AdamW, group_by_length sampling.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medtune.settings import config as C
from medtune.settings.runs import RunDir
from medtune.stages import train

ROOT = Path(__file__).resolve().parents[2]

# One process of training: argv = profile, "new:<outputs root>" or an existing run folder, seconds to sleep after
# each optimizer step (paces the victim run so that the kill lands between checkpoints; it changes no number).
CHILD = r"""
import json, sys, time
import torch
from transformers import TrainerCallback
from medtune.settings import config
from medtune.stages import data, modeling, train
from medtune.settings.runs import RunDir

torch.set_num_threads(1)
profile, where, pace = sys.argv[1], sys.argv[2], float(sys.argv[3])
cfg = config.load(profile)
run = RunDir.create(cfg, where.removeprefix("new:")) if where.startswith("new:") else RunDir.open(where)
print("RUN", run.path, flush=True)
model, tokenizer = modeling.load_model(cfg)
if not run.train_data_path.is_file():
    data.prepare(cfg, run, tokenizer)  # 03; a re-run of 05 finds it in the run

class Pace(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(pace)

trainer = train.build_trainer(cfg, run, model, tokenizer)
trainer.add_callback(Pace())
print("RESULT", json.dumps(train.train(trainer, run)), flush=True)
"""

# Short rows (the prompt template alone is ~90 tokens): every training text fits max_length 256.
ROWS = [{"Question": f"A patient presents with sign {i} and fever. What is the next step?",
         "Complex_CoT": f"Sign {i} with fever suggests infection {i % 3}; check the usual causes first.",
         "Response": f"Order test {i} and start treatment {i % 2}."} for i in range(10)]


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> Path:
    """The smoke profile pointed at a tiny random Llama with SmolLM2's tokenizer and ten short rows."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from medtune.stages import modeling

    folder = tmp_path_factory.mktemp("resume")
    smollm = modeling.resolve_model(C.load(ROOT / "params" / "smoke.yaml"))  # converted once, cached
    tok = AutoTokenizer.from_pretrained(smollm)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, tie_word_embeddings=True,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    tiny.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    d = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text(encoding="utf-8"))
    d.update(model=str(folder / "model"), dataset=str(folder / "rows.jsonl"), max_rows=None, heldout_rows=[0],
             heldout_size=2, source="local")
    d["sft"] = {**d["sft"], "max_steps": 6, "save_steps": 2, "max_length": 256, "logging_steps": 1}
    (folder / "profile.yaml").write_text(yaml.safe_dump(d), encoding="utf-8")
    return folder / "profile.yaml"


def child(profile: Path, where: str, pace: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(profile), where, str(pace)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[Path, dict]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    run = Path(next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("RUN ")))
    result = json.loads(next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("RESULT ")))
    return run, result


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_adapter(tiny_profile, tmp_path):
    """Tolerance: max |difference| <= 1e-5 over every LoRA weight. Both runs do the same float32 arithmetic on one
    thread; the resumed one reloads the fp32 LoRA weights, AdamW and scheduler states and RNG states exactly from
    the checkpoint and skips the batches already seen, so they agree to the last bit on this CPU (measured: 0.0).
    1e-5 leaves room for a platform whose kernels are not bitwise reproducible, and is still ~100x below the size
    of one optimizer step here (lr 2e-4; a dropped, repeated or reordered batch, or another dropout mask, changes
    weights by more than 1e-4)."""
    reference, ref_result = finish(child(tiny_profile, f"new:{tmp_path / 'reference'}"))
    assert ref_result["steps"] == 6 and ref_result["resumed_from"] is None

    victim = child(tiny_profile, f"new:{tmp_path / 'interrupted'}", pace=0.5)
    deadline = time.monotonic() + 240
    ckpts = None
    while time.monotonic() < deadline and victim.poll() is None:
        runs = list((tmp_path / "interrupted").glob("*/checkpoints"))
        done = [p for p in runs[0].glob("checkpoint-*") if train.checkpoint_complete(p)] if runs else []
        if done:
            ckpts = runs[0]
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    out, _ = victim.communicate(timeout=60)
    assert ckpts is not None, f"no checkpoint before the process ended or the deadline:\n{out[-3000:]}"
    assert victim.returncode == -signal.SIGKILL
    run = ckpts.parent
    assert not (run / "adapter").exists()  # killed part-way: training did not finish
    saved = sorted(p.name for p in ckpts.glob("checkpoint-*"))
    assert "checkpoint-6" not in saved and saved[0] == "checkpoint-2", saved

    resumed, result = finish(child(tiny_profile, str(run)))  # a re-run of 05 on the same run
    assert resumed == run
    assert result["resumed_from"] in ("checkpoint-2", "checkpoint-4")
    assert result["steps"] == 6 and result["steps_this_session"] == 6 - int(result["resumed_from"].split("-")[1])
    # train_loss covers the resumed steps only; train_loss_run all 6, and equals the uninterrupted run's loss
    assert ref_result["train_loss_run"] == ref_result["train_loss"] and ref_result["train_loss_run_steps"] == 6
    assert result["train_loss_run_steps"] == 6
    assert result["train_loss_run"] == pytest.approx(ref_result["train_loss"], abs=1e-6)
    assert result["train_loss"] != pytest.approx(ref_result["train_loss"], abs=1e-3)  # the part is not the whole
    a, b = adapter(reference), adapter(run)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in 2 layers
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed from {result['resumed_from']}; max |adapter difference| = {diff:.3g}")
    assert diff <= 1e-5, diff
    moved = max(float((a[k] - adapter_init(a, k)).abs().max()) for k in a if "lora_B" in k)
    assert moved > 1e-4  # training moved the weights: the comparison is not between two untouched adapters


def test_run_loss_by_hand():
    """Logged losses are means over the steps since the previous log (transformers 5.23 _maybe_log_save_evaluate)."""
    history = [{"loss": 2.0, "step": 2}, {"loss": 1.0, "step": 4}, {"loss": 0.5, "step": 6},
               {"train_runtime": 9.0, "train_loss": 0.45, "step": 8}]
    # resumed from checkpoint-4, then 4 more steps at a mean of 0.4: (2.0 * 2 + 1.0 * 2 + 0.4 * 4) / 8 = 0.95
    assert train.run_loss(history, 4, 0.4, 4) == (pytest.approx(0.95), 8)
    # logging every 3 steps, checkpoint at 4: step 4 was never logged, so 5 of the 6 steps are averaged
    assert train.run_loss([{"loss": 2.0, "step": 3}], 4, 0.5, 2) == (pytest.approx((2.0 * 3 + 0.5 * 2) / 5), 5)
    assert train.run_loss([], 0, 1.25, 28) == (1.25, 28)  # a fresh run: the trainer's own figure
    with pytest.raises(ValueError, match="no optimizer step"):
        train.run_loss([], 0, 0.0, 0)


def adapter_init(weights: dict, key: str):
    """LoRA's B matrices start at zero (PEFT's default init)."""
    return weights[key].new_zeros(weights[key].shape)


def write_checkpoint(folder: Path, step: int, files=train.CHECKPOINT_FILES, state: str | None = None) -> Path:
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    for name in files:
        (ckpt / name).write_text(state if name == "trainer_state.json" and state is not None else
                                 json.dumps({"global_step": step}) if name == "trainer_state.json" else "x")
    return ckpt


def test_last_checkpoint_passes_over_a_half_written_one(tmp_path, capsys):
    """A process killed while writing checkpoint-N leaves a folder without trainer_state.json (written last by
    transformers); resuming from it would restart at step 0 with half-saved weights. The last complete one wins."""
    run = RunDir.create(C.load(ROOT / "params" / "smoke.yaml"), root=tmp_path)
    assert train.last_checkpoint(run) is None  # no checkpoints folder: a fresh start
    write_checkpoint(run.checkpoints_dir, 2)
    write_checkpoint(run.checkpoints_dir, 10)
    write_checkpoint(run.checkpoints_dir, 4, files=("optimizer.pt", "scheduler.pt"))  # killed before rng/state
    write_checkpoint(run.checkpoints_dir, 12, state='{"global_st')  # killed while writing the state file
    write_checkpoint(run.checkpoints_dir, 14, files=())  # only the adapter
    (run.checkpoints_dir / "checkpoint-16").mkdir()  # created, nothing in it
    assert train.last_checkpoint(run) == str(run.checkpoints_dir / "checkpoint-10")
    out = capsys.readouterr().out
    assert "checkpoint-16 is incomplete" in out and "checkpoint-12 is incomplete" in out
    assert (run.checkpoints_dir / "checkpoint-16").is_dir()  # reported, never deleted
