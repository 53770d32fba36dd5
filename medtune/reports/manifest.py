"""A run's manifest: which code, versions, hardware, data, seeds and profile it used, and when it ran.

``outputs/<run-id>/manifest.json``, beside metrics.json, written by the pipeline (:mod:`medtune.pipeline`):
:func:`start` when a run is created or resumed (one entry per session in ``sessions``), :func:`finish` when the session
ends, finished or not (a failing notebook, a dead kernel, Ctrl-C, SIGTERM). A run whose process was killed outright
(``kill -9``, a reboot) keeps ``"status": "running"``; :func:`status` tells it from a live run by the recorded
process.

What it records (and never: environment variables, tokens, the command line)::

    run_id, status ("running" | "finished" | "failed" | "interrupted" | "stopped"), notebook (where it failed or
    stopped),
    error (the exception's type), started_at / ended_at (UTC, ISO 8601), notebooks (the run order),
    code:      git commit of the medtune checkout that ran, dirty flag (tracked files changed), medtune version
    python:    version, implementation;  platform
    packages:  installed version of every package pinned in pyproject.toml (None: not installed)
    hardware:  device "cuda" or "cpu"; GPUs (name, memory, driver) from nvidia-smi; the CUDA version of the driver
               and of torch's build; CPU model, cores, RAM
    dataset:   source, config, split, where it is read from (hub, modelscope, package, file, folder); the rows
               trained on (data/train.jsonl): count, sha256
    seeds:     seed (split, LoRA init), sft.seed (trainer; TRL's default is the run's seed), sft.data_seed
    profile:   the params file of the first session, its sha256; config_sha256: of the run's config.yaml
    sessions:  each start/resume: started_at, ended_at, status, params and their sha256, resumed
    process:   pid, its start time and the host name, so a killed run is told from a running one
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from medtune.reports import tables
from medtune.settings.runs import RunDir

SCHEMA = 1
NOT_A_CHECKOUT = "not a git checkout"


def now() -> str:
    """The current UTC time as ISO 8601 to the second, e.g. ``"2026-12-07T03:52:14Z"``."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, as 64 hex digits.

    Raises:
        FileNotFoundError: no such file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(folder: str | Path | None = None) -> dict:
    """The git state of the medtune code that runs.

    Args:
        folder: a folder of the checkout (default: the folder of this ``medtune`` package, so the commit is that of
            the code actually imported, wherever the command was started).

    Returns:
        ``{"git_commit": 40 hex digits, "git_dirty": bool, "medtune_version": str}``; outside a git checkout (an
        installed wheel, no git) ``git_commit`` is ``"not a git checkout"`` and ``git_dirty`` None. Dirty means a
        tracked file differs from the commit (``git status --porcelain --untracked-files=no``); untracked files are
        not counted. The version is the installed distribution's (None when medtune is not installed).
    """
    import importlib.metadata

    try:
        version = importlib.metadata.version("medtune")
    except importlib.metadata.PackageNotFoundError:
        version = None
    folder = Path(folder) if folder else Path(__file__).resolve().parents[1]
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return {"git_commit": NOT_A_CHECKOUT, "git_dirty": None, "medtune_version": version}
    changes = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if changes is None else bool(changes), "medtune_version": version}


def package_versions() -> dict[str, str | None]:
    """``{distribution: installed version}`` for every package pinned in pyproject.toml (dependencies and optional
    groups, :func:`medtune.stages.preflight.tested_versions`); None for one that is not installed. Sorted by name."""
    import importlib.metadata

    from medtune.stages import preflight

    out: dict[str, str | None] = {}
    for name in sorted(preflight.tested_versions()):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(*args: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def hardware() -> dict:
    """The machine the run uses.

    GPUs come from ``nvidia-smi`` (name, memory in GiB, driver; no CUDA context is created in this process, which
    would hold GPU memory for the whole run), or from ``torch.cuda.get_device_name`` when torch sees CUDA but there
    is no nvidia-smi.

    Returns:
        ``{"device": "cuda" | "cpu", "gpus": [{"name", "memory_gib", "driver"}], "cuda_driver": the highest CUDA
        version the driver supports (nvidia-smi's header) or None, "cuda_torch": the CUDA version torch was built
        with (``torch.version.cuda``; None: a CPU build), "cpu": model name, "cpu_cores": logical cores,
        "memory_gib": RAM}``.
    """
    import psutil

    out: dict = {"device": "cpu", "gpus": [], "cuda_driver": None, "cuda_torch": None, "cpu": _cpu_model(),
                 "cpu_cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    listing = _nvidia_smi("--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits")
    for line in (listing or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                memory = round(float(parts[1]) / 1024, 1)  # MiB
            except ValueError:
                memory = None
            out["gpus"].append({"name": parts[0], "memory_gib": memory, "driver": parts[2]})
    header = _nvidia_smi() or ""
    found = re.search(r"CUDA Version:\s*([\d.]+)", header)
    out["cuda_driver"] = found.group(1) if found else None
    try:
        import torch
    except ImportError:
        return out
    out["cuda_torch"] = torch.version.cuda
    if torch.cuda.is_available():
        out["device"] = "cuda"
        if not out["gpus"]:
            out["gpus"] = [{"name": torch.cuda.get_device_name(i), "memory_gib": None, "driver": None}
                           for i in range(torch.cuda.device_count())]
    return out


def environment() -> dict:
    """What :func:`start` records about the software and the machine: ``{"code", "python", "platform", "packages",
    "hardware"}`` (see :func:`code_version`, :func:`package_versions`, :func:`hardware`). Reads no environment
    variable."""
    return {
        "code": code_version(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "platform": platform.platform(),
        "packages": package_versions(),
        "hardware": hardware(),
    }


def train_rows(run: RunDir) -> dict:
    """The fingerprint of the rows the run trains on: notebook 03's ``data/train.jsonl`` (the formatted rows, in
    the order they are given to the trainer).

    Returns:
        ``{"file": "data/train.jsonl", "rows": line count, "sha256": of the file's bytes}``; ``rows`` and ``sha256``
        are None while the file does not exist (03 has not run).
    """
    path = run.train_data_path
    if not path.is_file():
        return {"file": "data/train.jsonl", "rows": None, "sha256": None}
    with open(path, "rb") as fh:
        count = sum(1 for line in fh if line.strip())
    return {"file": "data/train.jsonl", "rows": count, "sha256": file_sha256(path)}


def read_from(cfg: dict) -> str | None:
    """Where a run's dataset is read from: ``"hub"`` (with the mirror's address when ``hub_endpoint`` is set) or
    ``"modelscope"`` for a repo id (``dataset_source``, else ``source``), else the kind of local source
    (``"package"``, ``"file"``, ``"folder"``, ``"path"``: :func:`medtune.io.sources.parse_source`); None without a
    dataset."""
    from medtune.io import sources

    if not cfg.get("dataset"):
        return None
    try:
        kind = sources.parse_source(cfg["dataset"]).kind
    except sources.SourceSpecError:
        return None
    if kind != "hub":
        return kind
    where = cfg.get("dataset_source") or cfg.get("source") or "hub"
    return f"hub ({cfg['hub_endpoint']})" if where == "hub" and cfg.get("hub_endpoint") else where


def _dataset(run: RunDir) -> dict:
    cfg = tables.settings(run)
    return {"source": cfg.get("dataset"), "config": cfg.get("dataset_config"), "split": cfg.get("dataset_split"),
            "read_from": read_from(cfg), "max_rows": cfg.get("max_rows"), "train_rows": train_rows(run)}


def _seeds(run: RunDir) -> dict:
    cfg = tables.settings(run)
    sft = cfg.get("sft") or {}
    return {"seed": cfg.get("seed"), "sft.seed": sft.get("seed", cfg.get("seed")),
            "sft.data_seed": sft.get("data_seed")}


def _shown_path(path: Path) -> str:
    """``path`` relative to the project folder when inside it (a profile in params/), else as given."""
    from medtune.settings.config import project_root

    try:
        return str(path.resolve().relative_to(project_root()))
    except ValueError:
        return str(path)


def read(run: RunDir) -> dict:
    """The run's manifest, ``{}`` when it has none (a run started from JupyterLab, or before this feature).

    Raises:
        ValueError: manifest.json is not valid JSON (names the file).
    """
    if not run.manifest_path.is_file():
        return {}
    try:
        return json.loads(run.manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{run.manifest_path} is not valid JSON ({err}); delete it to have the next "
                         "make run-all RESUME=... write a new one") from err


def _write(run: RunDir, data: dict) -> None:
    tmp = run.manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(run.manifest_path)


def start(run: RunDir, params: str | Path, notebooks: list[str], *, resumed: bool = False) -> dict:
    """Record that a session of the run starts: the environment (:func:`environment`), dataset, seeds, profile,
    and a new entry in ``sessions``; ``status`` becomes ``"running"``. A resumed run keeps its first
    ``started_at`` and ``profile``; the environment is that of the latest session (each session keeps its own
    params hash).

    Args:
        run: the run. params: the profile YAML this session runs with (for a resume without a profile: the run's
            config.yaml). notebooks: the notebooks' names in run order, without ``.ipynb``.
        resumed: True when an existing run is continued.

    Returns:
        The manifest as written.

    Raises:
        FileNotFoundError: ``params`` does not exist.
    """
    import psutil

    params = Path(params)
    data = read(run)
    stamp = now()
    session = {"started_at": stamp, "ended_at": None, "status": "running", "params": _shown_path(params),
               "params_sha256": file_sha256(params), "resumed": resumed}
    data.update({
        "schema": SCHEMA,
        "run_id": run.run_id,
        "status": "running",
        "notebook": None,
        "error": None,
        "started_at": data.get("started_at") or stamp,
        "ended_at": None,
        "notebooks": list(notebooks),
        **environment(),
        "dataset": _dataset(run),
        "seeds": _seeds(run),
        "profile": data.get("profile") or {"path": session["params"], "sha256": session["params_sha256"]},
        "config_sha256": file_sha256(run.config_path),
        "sessions": [*data.get("sessions", []), session],
        "process": {"pid": os.getpid(), "started": psutil.Process().create_time(), "host": socket.gethostname()},
    })
    _write(run, data)
    return data


def finish(run: RunDir, status: str, notebook: str | None = None, error: str | None = None) -> dict:
    """Record that the session ends: its status, the end time, and the data fingerprint and config hash as they are
    now (03 writes the rows during the session).

    Args:
        run: the run. status: ``"finished"``, ``"failed"``, ``"interrupted"`` (Ctrl-C) or ``"stopped"`` (SIGTERM:
            ``kill``, ``docker stop``, a job scheduler).
        notebook: where it failed or was interrupted (name without ``.ipynb``); None when finished.
        error: the exception's type name (never its message, which could quote anything).

    Returns:
        The manifest as written.

    Raises:
        ValueError: an unknown status, or the run has no manifest (:func:`start` was not called).
    """
    if status not in ("finished", "failed", "interrupted", "stopped"):
        raise ValueError(f"status must be 'finished', 'failed', 'interrupted' or 'stopped', got {status!r}")
    data = read(run)
    if not data:
        raise ValueError(f"{run.path} has no manifest.json: call manifest.start first")
    stamp = now()
    data.update({"status": status, "notebook": notebook, "error": error, "ended_at": stamp,
                 "dataset": _dataset(run), "config_sha256": file_sha256(run.config_path)})
    if data.get("sessions"):
        data["sessions"][-1].update(ended_at=stamp, status=status)
    _write(run, data)
    return data


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands. ``state``: ``"finished"``, ``"failed"``, ``"interrupted"``, ``"running"``, ``"stopped"``
    (stopped from outside: by SIGTERM, recorded, or recorded as running but its process is gone: killed),
    ``"unknown"`` (no manifest) or, in the index of runs
    only, ``"unreadable"`` (a file of the run could not be read). ``notebook``: where it
    failed, stopped or is running (name without ``.ipynb``), or None. ``text``: what a person reads, e.g.
    ``"failed in 04_baseline"``."""

    state: str
    notebook: str | None
    text: str


def _alive(process: dict) -> bool:
    import psutil

    if not process or process.get("host") != socket.gethostname():
        return True  # another machine: trust the record
    try:
        return abs(psutil.Process(process["pid"]).create_time() - process.get("started", 0)) < 1.0
    except (psutil.Error, KeyError, TypeError):
        return False


def live_process(run: RunDir) -> dict | None:
    """The process record (``{"pid", "host", "started"}``) of a run that is running now on this machine: its
    manifest says running and a process with that pid and start time exists here. None otherwise, also for a run
    recorded as running on another host (a pod restarted under a new name must still be able to resume)."""
    data = read(run)
    process = data.get("process") if isinstance(data, dict) and data.get("status") == "running" else None
    if not isinstance(process, dict) or process.get("host") != socket.gethostname():
        return None
    return process if _alive(process) else None


def status(run: RunDir) -> RunStatus:
    """The run's :class:`RunStatus`, from its manifest and the notebooks it completed (``metrics.json``,
    ``pipeline.completed``).

    A run recorded as running whose process is gone on this machine (same host, no process with that pid and
    start time) is ``"stopped"`` in the first notebook it did not complete; one the pipeline recorded as stopped
    (SIGTERM) is ``"stopped"`` in the notebook it recorded, its text saying SIGTERM. Without a manifest the state is
    ``"unknown"`` and the text counts the notebooks that recorded their resources.
    """
    data = read(run)
    metrics = run.metrics()
    if not data:
        done = len(metrics.get("resources", {}))
        return RunStatus("unknown", None, f"no manifest (not run by make run-all); {done} notebooks recorded")
    state, notebook = data.get("status", "unknown"), data.get("notebook")
    if state == "running":
        completed = {Path(n).stem for n in metrics.get("pipeline", {}).get("completed", [])}
        notebook = next((n for n in data.get("notebooks", []) if n not in completed), None)
        if not _alive(data.get("process", {})):
            return RunStatus("stopped", notebook, f"stopped in {notebook} (its process is gone)" if notebook
                             else "stopped (its process is gone)")
        return RunStatus("running", notebook, f"running {notebook}" if notebook else "running")
    if state in ("failed", "interrupted"):
        return RunStatus(state, notebook, f"{state} in {notebook}" if notebook else state)
    if state == "stopped":  # recorded by the pipeline on SIGTERM
        return RunStatus(state, notebook, f"stopped in {notebook} (SIGTERM)" if notebook else "stopped (SIGTERM)")
    return RunStatus(state, notebook, state)

