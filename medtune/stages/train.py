"""LoRA SFT (the walkthrough's step 05): PEFT LoRA on the 4-bit model, trained with TRL's SFTTrainer.

The walkthrough's arguments live in the profile's ``lora`` and ``sft`` sections and go to ``LoraConfig`` and
``SFTConfig`` unchanged. What this module adds: CPU fallbacks for CUDA-only options, resuming from the run's last
checkpoint, the Llama 4 fixes from :mod:`medtune.compat`, and the figures users pay for (tokens/s, peak GiB).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from medtune.settings import config as _config
from medtune.stages import data as _data

GIB = 2**30


def _derived_args(cfg: _config.RunConfig, model) -> dict:
    """SFTConfig values that depend on the machine: CUDA-only optimizers and bf16 fall back on CPU, with a note."""
    extra = {}
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu:
        extra["use_cpu"] = True
        optim = str(cfg.sft.get("optim", ""))
        if optim.startswith("paged_"):
            extra["optim"] = "adamw_torch"
            print(f"note: optim '{optim}' needs CUDA (bitsandbytes paged optimizer); using 'adamw_torch' on CPU.")
    return extra


CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")
# a data-parallel run (num_processes > 1) writes one RNG state per process instead: rng_state_<rank>.pth


def checkpoint_complete(folder: str | Path) -> bool:
    """Whether a ``checkpoint-N`` folder was written to the end.

    transformers 5.23 (``Trainer._save_checkpoint``) writes a checkpoint in place, in this order: the adapter,
    ``optimizer.pt`` and ``scheduler.pt``, ``rng_state.pth``, then ``trainer_state.json`` last. A process killed
    in between (pre-emption, out of memory) leaves a folder without it, and resuming from such a folder restarts at
    step 0 from half-saved weights, or fails on the missing optimizer. Complete means: all of
    :data:`CHECKPOINT_FILES` present (``rng_state_0.pth`` for ``rng_state.pth`` after a data-parallel run,
    transformers 5.23 ``Trainer._save_rng_state``), adapter weights present, and ``trainer_state.json`` parses.
    """
    folder = Path(folder)
    rng = (folder / "rng_state.pth").is_file() or (folder / "rng_state_0.pth").is_file()
    if not rng or not all((folder / f).is_file() for f in CHECKPOINT_FILES if f != "rng_state.pth"):
        return False
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return False
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def last_checkpoint(run) -> str | None:
    """The newest complete ``checkpoint-N`` folder of the run (:func:`checkpoint_complete`), or None (fresh start).

    An incomplete newer folder (the process died while writing it) is reported and passed over, not deleted.

    Not transformers' ``trainer_utils.get_last_checkpoint``: it returns the highest-numbered ``checkpoint-N``
    folder whatever it holds, so after a pre-emption mid-save it would resume from the half-written one.
    """
    import re

    folder = run.checkpoints_dir
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(found):
        if checkpoint_complete(path):
            return str(path)
        print(f"note: {path.name} is incomplete (the process stopped while writing it); resuming from an earlier one.")
    return None


def build_trainer(cfg: _config.RunConfig, run, model, tokenizer):
    """An SFTTrainer over the run's formatted training data, with LoRA from ``cfg.lora``.

    Returns:
        :class:`trl.SFTTrainer`; the model inside is the PEFT-wrapped model.

    Raises:
        FileNotFoundError: notebook 03 has not written the training data. ConfigError: bad sft/lora settings.
        ValueError: LoRA or packing settings this Llama 4 model cannot train with (the message names the fix).
    """
    from datasets import Dataset
    from trl import SFTTrainer

    from medtune import compat, families, llama4

    train_pairs, _ = _data.read_split(run)
    dataset = Dataset.from_list([{"prompt": p["prompt"], "completion": p["completion"]} for p in train_pairs])
    args = _config.sft_config(cfg, run.checkpoints_dir, **_derived_args(cfg, model))
    lora = _config.lora_config(cfg)
    if families.is_llama4(model):
        llama4.check_lora_config(model, lora)
        if args.padding_free or args.packing:
            llama4.check_packing(model.config, args.max_length)
        compat.apply_llama4_trl_fixes(model)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    compat.cpu_adapters_in_compute_dtype(trainer)  # 6x faster on CPUs without bf16 units; see compat
    return trainer


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts of a PEFT model (4-bit weights counted unpacked)."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)


def run_loss(history: list[dict], resumed_at: int, session_loss: float, session_steps: int) -> tuple[float, int]:
    """The mean training loss over the whole run's optimizer steps, after a resume.

    The trainer's own figure covers only the steps of this call (transformers 5.23 ``Trainer._finalize_training``).
    The steps before the checkpoint are taken from the log history the checkpoint carries: each logged ``loss`` is
    the mean over the steps since the previous log, so it counts with that many steps. Steps between the last log and
    the checkpoint (a checkpoint off the logging grid) are in no log, so they are left out and the count says so.

    Args:
        history: ``trainer.state.log_history`` (the checkpoint's, then this call's), dicts with ``step`` and
            ``loss``.
        resumed_at: the checkpoint's step (0: a fresh start).
        session_loss: this call's mean loss (``TrainOutput.training_loss``). session_steps: this call's steps.

    Returns:
        ``(mean loss in nats/token, steps it covers)``; the steps equal the run's when every earlier step was logged.

    Raises:
        ValueError: no step to average over.
    """
    total, covered, previous = 0.0, 0, 0
    for entry in history:
        if "loss" in entry and 0 < entry.get("step", 0) <= resumed_at:
            steps = entry["step"] - previous
            total, covered, previous = total + entry["loss"] * steps, covered + steps, entry["step"]
    total, covered = total + session_loss * session_steps, covered + session_steps
    if covered == 0:
        raise ValueError("no optimizer step to average the training loss over.")
    return total / covered, covered


def train(trainer, run, resume: str | None = "last", write: bool | None = None) -> dict:
    """Train (resuming from the run's last complete checkpoint if there is one), save adapter, tokenizer and log.

    ``resume``: ``"last"`` (default) finds the run's last complete checkpoint (:func:`last_checkpoint`); a folder
    resumes from it; None starts fresh. A data-parallel run (:mod:`medtune.stages.distributed`) picks it once, before
    the processes start, and passes it to every rank, so that all ranks resume from the same checkpoint.
    ``write``: whether this process writes the adapter, tokenizer and ``train_log.json``; None: only the main process
    (``trainer.is_world_process_zero()``: always, with one process). The other ranks train the same and return their
    own figures.

    Checkpoints go to ``<run>/checkpoints/checkpoint-N`` every ``sft.save_steps`` optimizer steps. A resumed run
    continues where the checkpoint stopped: LoRA weights, optimizer and scheduler states, the data order (the
    Trainer skips the batches already seen) and the RNG states (dropout) come from the checkpoint, so it ends
    with the adapter an uninterrupted run with the same seed ends with (tests/pipeline/test_resume.py: max abs
    difference <= 1e-5 on CPU).

    Returns:
        ``{"train_loss", "train_loss_run", "train_loss_run_steps", "steps", "epochs", "runtime_s", "tokens",
        "tokens_per_s", "steps_this_session", "peak_gib", "resumed_from", "trainable_params", "optim"}``. ``steps``
        and ``tokens`` count the whole run (``tokens``: non-padding tokens seen in training, all epochs);
        ``train_loss`` (nats/token), ``runtime_s`` and ``tokens_per_s`` this call's steps only (after a resume: the
        steps after the checkpoint); ``train_loss_run`` the mean loss over the whole run's steps (:func:`run_loss`;
        ``train_loss_run_steps`` of them, fewer than ``steps`` only when the checkpoint was off the logging grid);
        ``peak_gib`` is
        ``torch.cuda.max_memory_allocated`` summed over GPUs, or the process's peak resident memory on CPU
        (``ru_maxrss``).
    """
    if resume == "last":
        resume = last_checkpoint(run)
    if write is None:
        write = trainer.is_world_process_zero()
    if resume and write:
        print(f"resuming from {resume}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - start
    # TrainOutput's loss covers only this call's steps (transformers 5.23 Trainer._finalize_training)
    steps_before = (json.loads((Path(resume) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
                    if resume else 0)
    steps_now = int(trainer.state.global_step) - int(steps_before)
    history = trainer.state.log_history
    if write:
        trainer.save_model(str(run.adapter_dir))
        trainer.processing_class.save_pretrained(str(run.adapter_dir))
        # PEFT writes a template card ("[More Information Needed]", a local base path); the real one is 07's
        # push/README.md
        (run.adapter_dir / "README.md").write_text(
            f"# LoRA adapter of medtune run `{run.run_id}`\n\nWritten by notebook 05. Its model card, with the "
            "training settings, the evaluation and usage, is written by notebook 07 into the run's `push/README.md`.\n",
            encoding="utf-8")
        run.train_log_path.write_text(json.dumps(history, indent=2), encoding="utf-8")
    epochs = float(trainer.state.epoch or 0)
    tokens_per_epoch = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    tokens = int(tokens_per_epoch * epochs)
    steps = int(trainer.state.global_step)
    tokens_now = tokens * steps_now / steps if steps else 0  # this call's share, for tokens/s
    train_loss = float(result.training_loss)
    if steps_now == 0:  # nothing left to train (re-run of a finished 05): keep the losses recorded by the run
        recorded = run.metrics().get("train", {})
        train_loss = recorded.get("train_loss", train_loss)
        loss_run = recorded.get("train_loss_run", train_loss)
        loss_run_steps = recorded.get("train_loss_run_steps", steps)
    else:
        loss_run, loss_run_steps = run_loss(history, int(steps_before), train_loss, steps_now)
    if torch.cuda.is_available():
        peak = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / GIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / GIB
    trainable, _ = trainable_parameters(trainer.model)
    return {
        "train_loss": train_loss,
        "train_loss_run": loss_run,
        "train_loss_run_steps": loss_run_steps,
        "steps": steps,
        "epochs": epochs,
        "runtime_s": round(runtime, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens_now / runtime, 1) if runtime > 0 and tokens_now else None,
        "steps_this_session": steps_now,
        "peak_gib": round(peak, 2),
        "resumed_from": Path(resume).name if resume else None,
        "trainable_params": trainable,
        "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),  # what ran (CPU: no paged optimizers)
    }


def loss_curve(run) -> str:
    """Plot the training loss (nats/token per logged optimizer step) from ``train_log.json`` and save it to the run's
    ``loss_curve.png``; returns that file's path (05 shows it with ``IPython.display.Image``, so the executed
    notebook carries the picture whatever matplotlib backend the kernel has)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    history = json.loads(run.train_log_path.read_text(encoding="utf-8"))
    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("LoRA SFT training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run.loss_curve_path, dpi=120)
    plt.close(fig)
    return str(run.loss_curve_path)
