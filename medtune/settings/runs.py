"""The run directory: ``outputs/<run-id>/`` and the path of every artifact in it.

A run is created once (a new id each time; never overwritten) and then continued by each notebook of the
pipeline. Its ``config.yaml`` is the settings every notebook of the run reads; ``metrics.json`` collects one
section per notebook.

Layout::

    outputs/<run-id>/
        config.yaml          settings of the run (RunConfig)
        metrics.json         one section per notebook ("auth", "load", "gpu", "data", "baseline", "train", ...)
        manifest.json        code, versions, hardware, data fingerprint, seeds, times, status (medtune.reports)
        index.html           the run's report (make report); notebooks/NN_*.html: the executed notebooks as HTML
        notebooks/           executed notebooks (the reports), written by the pipeline
        data/heldout.jsonl   held-out examples (never trained on)
        data/train.jsonl     training examples, formatted
        data/skipped_rows.jsonl  every row left out with bad_rows: skip (number and reason), when there are any
        baseline.jsonl       un-tuned answers to the held-out questions (04)
        finetuned.jsonl      answers with the adapter (06)
        checkpoints/         SFT checkpoints (05)
        adapter/             the trained LoRA adapter + tokenizer (05)
        train_log.json       the trainer's log history (05)
        loss_curve.png       training loss (05)
        push/                exactly the folder 07 uploads (or would, in a dry run)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.settings import config as _config
from medtune.settings.config import project_root


def outputs_root() -> Path:
    """Where runs are written: ``$MEDTUNE_OUTPUTS`` if set, else ``<project root>/outputs``."""
    env = os.environ.get("MEDTUNE_OUTPUTS")
    return Path(env).resolve() if env else project_root() / "outputs"


@dataclass(frozen=True)
class RunDir:
    """One run's folder. Every artifact path the notebooks use comes from here."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.json")
    manifest_path = property(lambda self: self.path / "manifest.json")
    report_path = property(lambda self: self.path / "index.html")
    notebooks_dir = property(lambda self: self.path / "notebooks")
    heldout_path = property(lambda self: self.path / "data" / "heldout.jsonl")
    train_data_path = property(lambda self: self.path / "data" / "train.jsonl")
    skipped_rows_path = property(lambda self: self.path / "data" / "skipped_rows.jsonl")
    baseline_path = property(lambda self: self.path / "baseline.jsonl")
    finetuned_path = property(lambda self: self.path / "finetuned.jsonl")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    adapter_dir = property(lambda self: self.path / "adapter")
    train_log_path = property(lambda self: self.path / "train_log.json")
    train_result_path = property(lambda self: self.path / "train_result.json")  # 05 with num_processes > 1
    loss_curve_path = property(lambda self: self.path / "loss_curve.png")
    push_dir = property(lambda self: self.path / "push")

    # ---------------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: _config.RunConfig, root: Path | None = None) -> RunDir:
        """Make a new run folder ``<root>/<UTC time>-<profile>-<random>`` and write ``cfg`` to its config.yaml.

        The time is to the microsecond (``20261129-120000-123456``), so ids sort in creation order even for runs
        made within one second (:meth:`latest` relies on it). Never reuses a folder: the id has 6 random hex
        digits and creation fails if it exists.
        """
        root = Path(root) if root else outputs_root()
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S-%f")
        path = root / f"{stamp}-{cfg.profile}-{secrets.token_hex(3)}"
        path.mkdir(parents=True, exist_ok=False)
        (path / "data").mkdir()
        run = cls(path)
        _config.dump(cfg, run.config_path)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run. Raises FileNotFoundError naming the folder if it has no config.yaml."""
        path = Path(path).resolve()
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{path} is not a medtune run (no config.yaml). Pass RUN_DIR=outputs/<run-id> of an existing run, "
                "or leave RUN_DIR empty in 00 to start a new one."
            )
        return cls(path)

    @classmethod
    def latest(cls, root: Path | None = None) -> RunDir | None:
        """The most recently created run under ``root`` (by id, which starts with its UTC time), or None."""
        root = Path(root) if root else outputs_root()
        runs = sorted(p for p in root.glob("*/config.yaml")) if root.is_dir() else []
        return cls(runs[-1].parent) if runs else None

    def config(self) -> _config.RunConfig:
        """The run's settings, read from its config.yaml."""
        return _config.load(self.config_path)

    # ---------------------------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """All recorded metrics, ``{}`` if none yet.

        Raises:
            ValueError: metrics.json is not a JSON object (truncated by a full disk, edited by hand); the message
                names the file and the fix.
        """
        if not self.metrics_path.is_file():
            return {}
        try:
            data = json.loads(self.metrics_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{self.metrics_path} is not valid JSON ({err}): restore it from a copy, or start a new "
                             "run (the notebooks record into it)") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.metrics_path} holds a {type(data).__name__}, not a JSON object of sections: "
                             "restore it from a copy, or start a new run")
        return data

    def record(self, section: str, values: dict[str, Any]) -> dict:
        """Merge ``values`` into ``metrics.json[section]`` (written atomically) and return the section."""
        data = self.metrics()
        data.setdefault(section, {}).update(values)
        tmp = self.metrics_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        tmp.replace(self.metrics_path)
        return data[section]

    def record_resources(self, notebook: str) -> dict:
        """Record what this notebook's kernel took, in ``metrics.json`` section ``resources`` under ``notebook``.

        The last cell of every notebook calls it (so a notebook that failed has no row). See :func:`peak_resources`
        for what is measured.

        Args:
            notebook: the notebook's name without ``.ipynb``, e.g. ``"04_baseline"``.

        Returns:
            The whole ``resources`` section: notebook name -> ``{"wall_s", "peak_gpu_gib", "peak_rss_gib"}``.

        Raises:
            ValueError: ``notebook`` is not a pipeline notebook's name (``NN_name``, no ``.ipynb``).
        """
        if not (len(notebook) > 3 and notebook[:2].isdigit() and notebook[2] == "_" and "." not in notebook):
            raise ValueError(f"record_resources takes a notebook's name such as '04_baseline', got {notebook!r}")
        return self.record("resources", {notebook: peak_resources()})

    def resources_table(self) -> str:
        """The ``resources`` section as a Markdown table, one row per notebook in run order, with the total time.

        Returns:
            Markdown text; a one-line note when no notebook has recorded its resources yet.
        """
        rows = self.metrics().get("resources", {})
        if not rows:
            return "No notebook of this run has recorded its resources yet."

        def gib(v):
            return "-" if v is None else f"{v:.2f}"

        lines = ["| notebook | wall time (min) | peak GPU memory (GiB) | peak CPU RSS (GiB) |", "|---|---|---|---|"]
        for name in sorted(rows):
            r = rows[name]
            lines.append(f"| {name} | {r['wall_s'] / 60:.2f} | {gib(r['peak_gpu_gib'])} | {gib(r['peak_rss_gib'])} |")
        total = sum(r["wall_s"] for r in rows.values())
        lines.append(f"| total | {total / 60:.2f} | | |")
        return "\n".join(lines)

    def __str__(self) -> str:  # notebooks print the run
        return str(self.path)


def _linux_peak_rss() -> int | None:
    """``VmHWM`` of /proc/self/status in bytes (this process image's peak RSS), or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except OSError:
        return None
    return None


def peak_resources() -> dict:
    """What this process (a notebook's kernel) has taken so far.

    Returns:
        ``{"wall_s": float, "peak_gpu_gib": float | None, "peak_rss_gib": float}``:
        ``wall_s``: seconds since the process started (``psutil.Process().create_time()``): for a notebook run by
        the pipeline (papermill starts one kernel per notebook) the notebook's time including imports; in JupyterLab
        the kernel's age. ``peak_gpu_gib``: ``torch.cuda.max_memory_allocated`` summed over the visible GPUs (tensors
        allocated through PyTorch's caching allocator, in GiB), ``None`` when this process never initialized CUDA
        (CPU runs, or notebooks that load no model). ``peak_rss_gib``: the process's peak resident set size in GiB,
        the kernel's own high-water mark (exact, unlike sampling ``psutil.Process().memory_info().rss``): on Linux
        ``VmHWM`` of /proc/self/status, elsewhere ``getrusage``'s ``ru_maxrss`` (on Windows psutil's ``peak_wset``).
        Not ``ru_maxrss`` on Linux: it keeps the high-water mark of the forked copy of the parent from before the
        kernel's exec, so every notebook started by a large process (a test run, a 2.8 GiB pytest) reported at least
        the parent's size.
    """
    import psutil

    proc = psutil.Process()
    wall = time.time() - proc.create_time()
    gpu = None
    torch = sys.modules.get("torch")  # a notebook that never imported torch used no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
    peak = _linux_peak_rss()
    if peak is None:
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
        except ImportError:  # Windows
            info = proc.memory_info()
            peak = getattr(info, "peak_wset", info.rss)
    return {"wall_s": round(wall, 3), "peak_gpu_gib": None if gpu is None else round(gpu, 3),
            "peak_rss_gib": round(peak / 2**30, 3)}


REHEARSAL_NOTICE = (
    "**Rehearsal: the weights are random, the answers meaningless.** This run builds {model}'s architecture at full "
    "size with random weights (`rehearsal: true`); nothing but its config.json and tokenizer is downloaded. Its times "
    "and memory are the real run's; its answers, losses, scores and adapter mean nothing."
)


def show_rehearsal_notice(cfg: _config.RunConfig) -> str:
    """Show, at the top of a notebook of a rehearsal run, that its weights are random and its answers meaningless.

    Args:
        cfg: the run's settings.

    Returns:
        The notice (Markdown), displayed in a notebook (printed elsewhere); ``""``, and nothing shown, for a real run.
    """
    if not cfg.rehearsal:
        return ""
    text = REHEARSAL_NOTICE.format(model=cfg.model)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Markdown(text))
    else:
        print(text)
    return text


def session(params: str, run_dir: str = "", *, new_run: bool = False, **overrides: Any):
    """Open the run a notebook works in, and its settings. The first call of every notebook.

    Args:
        params: path of the profile YAML (relative paths are tried against the working directory, then the
            project root). Used to create a new run; an existing run keeps the config.yaml it was created with.
        run_dir: ``outputs/<run-id>`` of an existing run; empty: a new run if ``new_run`` (notebook 00 or 01),
            else the latest run under outputs/.
        new_run: create a run when ``run_dir`` is empty.
        **overrides: notebook parameters; ``None`` keeps the run's value. Applied for this notebook only.

    Returns:
        ``(cfg, run)``: the :class:`~medtune.settings.config.RunConfig` and the :class:`RunDir`.

    Raises:
        ConfigError: bad profile or parameter. FileNotFoundError: no such run, or no run yet.
    """
    if run_dir:
        run = RunDir.open(_resolve(run_dir))
    elif new_run:
        run = RunDir.create(_config.load(_resolve(params)))
    else:
        run = RunDir.latest()
        if run is None:
            raise FileNotFoundError(
                f"no run under {outputs_root()} yet: run notebook 00 first, or `make run-all`, or set RUN_DIR."
            )
    cfg = run.config().replace(**overrides)
    print(f"run: {run.path}\nprofile: {cfg.profile}  model: {cfg.model}  dataset: {cfg.dataset}")
    return cfg, run


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    alt = project_root() / p
    if alt.exists():
        return alt
    # notebooks live one folder down: "../params/x.yaml" from notebooks/ and "params/x.yaml" from the root
    alt = project_root() / Path(*[part for part in p.parts if part != ".."])
    return alt if alt.exists() else p
