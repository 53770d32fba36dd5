"""Data-parallel training (``num_processes``, :mod:`medtune.stages.distributed`) against one process.

The default profile's real model (params/smoke.yaml: SmolLM2-135M-Instruct in NF4 on the CPU, LoRA r=64 on the seven
projections, TRL's SFTTrainer, AdamW, 4 optimizer steps on the shipped rows), trained twice on the
same formatted rows: 2 processes (accelerate launch, gloo) at per-device batch 1, and 1 process at batch 2. Both
have a global batch of 2 rows per optimizer step, so they must log the same loss at every step and end with the
same adapter. lora_dropout is 0 here: each rank draws its own dropout masks, so with dropout the two runs differ by
design, not by error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from medtune.settings import config as C
from medtune.settings.runs import RunDir
from medtune.stages import distributed

ROOT = Path(__file__).resolve().parents[2]


def _profile(folder: Path, name: str, num_processes: int, batch: int) -> Path:
    d = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text(encoding="utf-8"))
    d["profile"] = name
    d["num_processes"] = num_processes
    d["lora"] = {**d["lora"], "lora_dropout": 0.0}
    # random order: group_by_length sizes its mega-batches from the per-process batch (transformers 5.23
    # get_length_grouped_indices: min(rows // (4 x batch), 50) x batch rows), so 1 x 2 and 2 x 1 pair the rows
    # differently (measured: the same 4-step mean loss, steps 1-3 up to 7% apart); a seeded random permutation is
    # the same in every process and the global batch k is rows 2k, 2k+1 in both runs
    d["sft"] = {**d["sft"], "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
                "train_sampling_strategy": "random"}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d), encoding="utf-8")
    return path


def _losses(run: RunDir) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in json.loads(run.train_log_path.read_text(encoding="utf-8")) if "loss" in h]


def _adapter(run: RunDir) -> dict:
    from safetensors.torch import load_file

    return load_file(run.adapter_dir / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, monkeypatch, capsys):
    """Tolerances: 1e-5 relative on each step's loss; 1e-5 absolute on every LoRA weight.

    Measured (2-core CPU, float32, torch 2.13, 2026-12-07): per-step losses 3.307529, 3.289274, 3.357284, 3.433715,
    max relative difference 7.3e-8 (float32 rounding); adapter max |difference| 6.8e-7, where the largest LoRA weight
    is 4.2e-2 (lora_A, initialised random) and the largest lora_B (initialised 0, so all of it is training) 4.0e-4.
    The two runs do not add the same numbers in the same order (one process sums both rows' token losses in one
    padded batch; two processes each sum one row and gloo adds the two gradients), so they agree to float32
    rounding, not to the bit; AdamW (update ~ lr x g / sqrt(v)) passes such differences on at full size only for
    gradient components near zero, hence 6.8e-7 on the weights. 1e-5 is 20x below one step's update at lr 2e-4, so
    rows in other steps fail it (measured with group_by_length, which pairs the rows differently, see _profile:
    losses up to 7% apart, adapter 5.6e-4 apart). Resumed from checkpoint-2 in 2 processes, the adapter equals the
    uninterrupted 2-process run's (measured 0.0; tolerance 1e-5 as in tests/pipeline/test_resume.py).
    """
    from medtune.stages import data, modeling

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one = RunDir.create(C.load(_profile(tmp_path, "one", 1, 2)), tmp_path / "outputs")
    two = RunDir.create(C.load(_profile(tmp_path, "two", 2, 1)), tmp_path / "outputs")
    cfg_one, cfg_two = one.config(), two.config()
    tokenizer = modeling.load_tokenizer(modeling.resolve_model(cfg_one))
    data.prepare(cfg_one, one, tokenizer)  # 03, once: both runs train on the same formatted rows
    shutil.copytree(one.path / "data", two.path / "data", dirs_exist_ok=True)

    def global_batch(cfg):  # rows per optimizer step
        return cfg.sft["per_device_train_batch_size"] * cfg.sft["gradient_accumulation_steps"] * cfg.num_processes

    assert global_batch(cfg_one) == global_batch(cfg_two) == 2
    result_one = distributed.fit(cfg_one, one)
    result_two = distributed.fit(cfg_two, two)
    shown = capsys.readouterr().out
    assert "(gloo): -m accelerate.commands.launch --multi_gpu --num_processes 2" in shown
    assert "trainable params" in shown  # rank 0's output reached this process, line by line

    assert result_one["steps"] == result_two["steps"] == 4
    assert result_two["num_processes"] == 2
    assert result_one["tokens"] == result_two["tokens"]  # the same rows seen
    losses_one, losses_two = _losses(one), _losses(two)
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two] == [1, 2, 3, 4]
    rel = [abs(a - b) / abs(a) for (_, a), (_, b) in zip(losses_one, losses_two, strict=True)]

    import torch

    w1, w2 = _adapter(one), _adapter(two)
    assert sorted(w1) == sorted(w2) and len(w1) == 30 * 7 * 2  # 30 layers x 7 projections x (A, B)
    scale = max(float(t.abs().max()) for t in w1.values())
    worst = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    moved = max(float(w1[k].abs().max()) for k in w1 if "lora_B" in k)  # B starts at 0: how far training moved it
    print(f"\nper-step loss, 1 process: {[round(x, 6) for _, x in losses_one]}; 2 processes: "
          f"{[round(x, 6) for _, x in losses_two]}; max relative difference {max(rel):.2e}\n"
          f"adapter: max |difference| {worst:.2e}, largest |weight| {scale:.3e}, largest |lora_B| {moved:.3e}")
    assert max(rel) <= 1e-5, rel
    assert worst <= 1e-5, worst
    assert moved > 20 * 1e-5  # lora_B trained, far beyond the tolerance
    assert torch.isfinite(torch.tensor([x for _, x in losses_two])).all()

    # every rank resumes from the same checkpoint: drop the last one and the adapter (as if stopped after step 2),
    # train again, and end where the uninterrupted 2-process run ended
    shutil.rmtree(two.checkpoints_dir / "checkpoint-4")
    shutil.rmtree(two.adapter_dir)
    resumed = distributed.fit(cfg_two, two)
    assert resumed["resumed_from"] == "checkpoint-2" and resumed["steps"] == 4 and resumed["steps_this_session"] == 2
    assert "resuming from" in capsys.readouterr().out
    again = _adapter(two)
    redo = max(float((w2[k].float() - again[k].float()).abs().max()) for k in w2)
    print(f"resumed from checkpoint-2: adapter max |difference| to the uninterrupted run {redo:.2e}")
    assert redo <= 1e-5, redo
    assert [round(x, 5) for _, x in _losses(two)] == [round(x, 5) for _, x in losses_two]


def test_process_backend_and_its_errors():
    cfg = C.load(ROOT / "params" / "smoke.yaml")
    assert cfg.num_processes == 1 and C.process_backend(cfg, 8) is None
    cpu = cfg.replace(num_processes=4)
    assert C.process_backend(cpu, 0) == "gloo" and C.process_backend(cpu, 8) == "gloo"  # smoke: device cpu
    auto = cpu.replace(device="auto")
    assert C.process_backend(auto, 0) == "gloo"  # no GPU: the CPU, as modeling.device_map decides
    assert C.process_backend(auto, 4) == "nccl" and C.process_backend(auto.replace(device="cuda"), 8) == "nccl"
    with pytest.raises(C.ConfigError, match=r"'num_processes' is 4, but torch sees 2 GPU\(s\).*num_processes: 2"):
        C.process_backend(auto, 2)
    with pytest.raises(C.ConfigError, match=r"'num_processes' is 4, but torch sees 0 GPU\(s\)"):
        C.process_backend(auto.replace(device="cuda"), 0)


@pytest.mark.parametrize("value", [0, -2])
def test_num_processes_below_one_is_refused(value):
    with pytest.raises(C.ConfigError, match=rf"'num_processes' must be at least 1 .*got {value}"):
        C.load(ROOT / "params" / "smoke.yaml", num_processes=value)
    with pytest.raises(C.ConfigError, match=r"key 'num_processes' must be int, got '2'"):
        C.from_dict({"num_processes": "2"})


def test_launch_command(tmp_path):
    cfg = C.load(ROOT / "params" / "smoke.yaml", num_processes=3)
    run = RunDir.create(cfg, tmp_path)
    cmd = distributed.launch_command(cfg, run.path, config_path=tmp_path / "c.yaml", result_path=tmp_path / "r.json",
                                     resume=None, gpus=0)
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3", "--num_machines",
                       "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                       "-m", "medtune.stages.distributed", str(run.path), "--config", str(tmp_path / "c.yaml"),
                       "--result", str(tmp_path / "r.json"), "--resume", "none"]
    ckpt = str(run.checkpoints_dir / "checkpoint-2")
    gpu = cfg.replace(device="cuda", num_processes=2)
    cmd = distributed.launch_command(gpu, run.path, config_path="c", result_path="r", resume=ckpt, gpus=2)
    assert cmd[4:6] == ["--num_processes", "2"] and cmd[-2:] == ["--resume", ckpt]
    with pytest.raises(C.ConfigError, match="num_processes: 1"):
        distributed.launch_command(gpu, run.path, config_path="c", result_path="r", resume=None, gpus=1)
    with pytest.raises(C.ConfigError, match="'num_processes' is 1"):
        distributed.launch_command(cfg.replace(num_processes=1), run.path, config_path="c", result_path="r",
                                   resume=None, gpus=0)


def test_preflight_names_num_processes_before_any_download():
    from medtune.stages import preflight

    cfg = C.load(ROOT / "params" / "smoke.yaml", num_processes=2, device="cuda")  # this machine: no GPU
    checks = {c.name: c for c in preflight.check_settings(cfg)}
    assert checks["num_processes"].status == "error"
    assert "'num_processes' is 2, but torch sees 0 GPU(s)" in checks["num_processes"].detail
    assert checks["num_processes"].fix.startswith("num_processes: 1")
    cpu = {c.name: c.status for c in preflight.check_settings(cfg.replace(device="cpu"))}
    assert "num_processes" not in cpu and cpu["settings"] == "ok"  # gloo on the CPU
