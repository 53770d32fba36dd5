"""Data-parallel QLoRA for notebook 05: ``num_processes`` training processes started by ``accelerate launch``.

Each process loads the whole 4-bit model (:func:`medtune.stages.modeling.load_model`) on its own device, builds the
same SFTTrainer (:func:`medtune.stages.train.build_trainer`) and trains (:func:`medtune.stages.train.train`); the
Trainer (through accelerate) wraps the PEFT model in PyTorch DDP, gives each process its own share of every global
batch and averages the LoRA gradients over the processes before each optimizer step. So the ``sft`` section means
per process what it means on one GPU, and the global batch is ``per_device_train_batch_size x
gradient_accumulation_steps x num_processes``. The loss is normalised by the response tokens of the whole global
batch (transformers' ``average_tokens_across_devices``, on by default), so N processes at per-device batch b train
like one process at batch N x b (tests/pipeline/test_distributed.py).

Backends: one process per GPU over NCCL on CUDA; on CPU (``device: cpu``) N processes over gloo. accelerate 1.15's
``--cpu`` flag goes through its simple launcher, which starts one process (several only through ``mpirun`` and a
hostfile, ``prepare_simple_launcher_cmd_env``), so both cases use accelerate's ``--multi_gpu`` launcher, which is
torch's ``torchrun`` (``multi_gpu_launcher``): on CPU the Trainer's ``use_cpu`` then makes accelerate pick
``MULTI_CPU`` with gloo (``PartialState._prepare_backend``).

Only rank 0 writes the adapter, ``train_log.json`` and the result (``<run>/train_result.json``, which the notebook
reads back); every rank resumes from the checkpoint the launcher picked before starting them.

Out of scope: a model that does not fit one GPU (each process holds all of it; no ``device_map`` sharding).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from medtune.settings import config as _config

WORKER_MODULE = "medtune.stages.distributed"


def uses_cuda(cfg: _config.RunConfig) -> bool:
    """Whether the run trains on GPUs: ``device: cuda``, or ``auto`` with a GPU visible (as
    :func:`medtune.stages.modeling.device_map` decides)."""
    import torch

    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def backend(cfg: _config.RunConfig, gpus: int | None = None) -> str | None:
    """The collective backend the run's processes use, after checking ``num_processes`` against this machine
    (:func:`medtune.settings.config.process_backend` with this machine's GPU count).

    Args:
        cfg: run settings.
        gpus: visible GPUs (``torch.cuda.device_count()`` when None; a number for tests).

    Returns:
        None for ``num_processes: 1`` (no launch); ``"nccl"`` on CUDA (one process per GPU); ``"gloo"`` on CPU.

    Raises:
        ConfigError: ``num_processes`` > 1 on CUDA with fewer visible GPUs than processes (names the key and the
            fix).
    """
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    return _config.process_backend(cfg, gpus)  # the one decision; preflight (00) asks it too


def launch_command(cfg: _config.RunConfig, run_dir: str | Path, *, config_path: str | Path,
                   result_path: str | Path, resume: str | None, gpus: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line that starts ``cfg.num_processes`` workers on this host.

    ``python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no
    --dynamo_backend no --main_process_port 0 -m medtune.stages.distributed RUN_DIR --config ... --result ...
    --resume ...``: port 0 lets accelerate pick a free port (two runs on one host do not collide); mixed precision
    stays the ``sft`` section's (``bf16``), which the Trainer applies itself. See the module docstring for why
    ``--multi_gpu`` also on CPU.

    Raises:
        ConfigError: see :func:`backend`; also for ``num_processes: 1`` (nothing to launch).
    """
    kind = backend(cfg, gpus)
    if kind is None:
        raise _config.ConfigError("'num_processes' is 1: 05 trains in the notebook's own process, nothing to launch.")
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(cfg.num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", WORKER_MODULE, str(run_dir),
        "--config", str(config_path), "--result", str(result_path), "--resume", resume or "none",
    ]


def fit(cfg: _config.RunConfig, run) -> dict:
    """Notebook 05's training: in this process with ``num_processes: 1`` (load the model, build the trainer, print
    the trainable parameters, train: what 05's cells did before), else in ``num_processes`` launched processes
    (:func:`launch`; the notebook's kernel then loads no model, so it holds no copy on GPU 0 beside rank 0's).

    Here rather than in :mod:`medtune.stages.train`: the workers import ``train``, so ``train`` importing this
    module back would be an import cycle (tests/unit/test_layout.py).

    Returns:
        :func:`medtune.stages.train.train`'s dict (rank 0's, with :func:`launch`'s additions, when launched).

    Raises:
        what :func:`medtune.stages.modeling.load_model`, :func:`medtune.stages.train.build_trainer` and
        :func:`launch` raise.
    """
    from medtune.stages import modeling, train

    if cfg.num_processes > 1:
        return launch(cfg, run)
    model, tokenizer = modeling.load_model(cfg)
    trainer = train.build_trainer(cfg, run, model, tokenizer)
    trainer.model.print_trainable_parameters()
    return train.train(trainer, run)


def _stream(proc: subprocess.Popen, out) -> None:
    """Copy the workers' output to ``out`` as it comes, in chunks (progress bars redraw with ``\\r``, no newline)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(proc.stdout.fileno(), 4096):
        out.write(decoder.decode(chunk))
        out.flush()
    out.write(decoder.decode(b"", final=True))


def launch(cfg: _config.RunConfig, run, out=None) -> dict:
    """Train in ``cfg.num_processes`` processes (notebook 05 through :func:`fit`).

    Resolves the model once here (a first use converts or downloads it; the workers then only read it), picks the
    checkpoint to resume from (:func:`medtune.stages.train.last_checkpoint`) so that every rank resumes from the
    same one, starts :func:`launch_command` and copies the workers' output to ``out`` (default: this process's
    stdout, i.e. the notebook cell) live.

    Returns:
        rank 0's :func:`medtune.stages.train.train` result (read from ``<run>/train_result.json``), with
        ``num_processes`` and ``peak_gib_per_process`` added; ``peak_gib`` is the sum over the processes.

    Raises:
        ConfigError: see :func:`backend`. RuntimeError: a worker failed (exit status, the output above says why).
        KeyboardInterrupt: interrupted; the workers are stopped first (checkpoints stay for a resume).
    """
    from medtune.stages import modeling, train

    out = out or sys.stdout
    backend(cfg)  # before anything is started
    modeling.resolve_model(cfg)
    resume = train.last_checkpoint(run)
    result_path = run.train_result_path
    result_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="medtune-launch-") as tmp:
        config_path = Path(tmp) / "config.yaml"
        _config.dump(cfg, config_path)  # the notebook's settings (with its parameters), not only the run's file
        cmd = launch_command(cfg, run.path, config_path=config_path, result_path=result_path, resume=resume)
        print(f"launching {cfg.num_processes} training processes ({backend(cfg)}):", " ".join(cmd[1:]), flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                cwd=_config.project_root(), start_new_session=True)
        try:
            _stream(proc, out)
            code = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher's own process group: accelerate, torchrun, workers
            proc.wait(timeout=60)
            raise
    if code != 0 or not result_path.is_file():
        raise RuntimeError(f"the {cfg.num_processes} training processes failed (exit status {code}); their output "
                           "is above. Re-running 05 resumes from the last complete checkpoint.")
    return json.loads(result_path.read_text(encoding="utf-8"))


def worker(run_dir: str | Path, config_path: str | Path, result_path: str | Path, resume: str | None) -> dict:
    """One training process (started by ``accelerate launch``): load, build, train; rank 0 writes the result.

    On CUDA the process trains on GPU ``LOCAL_RANK``. Returns this rank's result (rank 0's also goes to
    ``result_path``, with every rank's peak memory).
    """
    import torch

    from medtune.settings.runs import RunDir
    from medtune.stages import modeling, train

    cfg = _config.load(config_path)
    run = RunDir.open(run_dir)
    if uses_cuda(cfg):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    model, tokenizer = modeling.load_model(cfg)
    trainer = train.build_trainer(cfg, run, model, tokenizer)
    if trainer.is_world_process_zero():
        trainer.model.print_trainable_parameters()
    result = train.train(trainer, run, resume=resume)
    peaks = [result["peak_gib"]]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, result["peak_gib"])
    if trainer.is_world_process_zero():
        result = {**result, "peak_gib": round(sum(peaks), 2), "peak_gib_per_process": peaks,
                  "num_processes": len(peaks)}
        tmp = Path(result_path).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
        tmp.replace(result_path)
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m medtune.stages.distributed RUN_DIR --config C --result R --resume CHECKPOINT|none``."""
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}", description=worker.__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--config", required=True, help="the settings (YAML) every rank trains with")
    parser.add_argument("--result", required=True, help="where rank 0 writes the result (JSON)")
    parser.add_argument("--resume", default="none", help="checkpoint folder every rank resumes from, or none")
    args = parser.parse_args(argv)
    worker(args.run_dir, args.config, args.result, None if args.resume == "none" else args.resume)


if __name__ == "__main__":
    main()
