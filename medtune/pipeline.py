"""Headless runs: every notebook, in order, through papermill into one run directory (``make run-all``).

``python -m medtune.pipeline --params params/default.yaml`` creates a new ``outputs/<run-id>/`` (a new id every
time; no run is ever overwritten) and executes ``notebooks/NN_*.ipynb`` into ``outputs/<run-id>/notebooks/``. A
failing notebook stops the run; its executed copy keeps the failing cell and its error, and the command exits
non-zero. When the kernel dies (killed by the operating system, most often for memory), the executed copy says so
in the cell that was running, with how to resume. While a notebook runs, a heartbeat line every minute
(``$MEDTUNE_HEARTBEAT_S``) says how long it has run and what it showed last (its progress bar), so that a working
run is told from a hung one. Ctrl-C and SIGTERM (``kill``, ``docker stop``, a job scheduler) stop a run the same
way: the kernel shut down, the end recorded, the report written, the command that continues the run printed. An
existing run is continued only when asked: ``--resume <run-id or outputs/<run-id>>`` (``make run-all RESUME=...``)
skips the notebooks that completed and training resumes from its last checkpoint. The run's ``manifest.json``
records what it ran with and how it ended; at the end, finished or not, ``python -m medtune.pipeline`` writes the
run's HTML report (``outputs/<run-id>/index.html``) and the index of runs (``outputs/index.html``), unless
``--no-report``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from medtune.settings import config as _config
from medtune.settings.runs import RunDir, outputs_root, project_root


class Terminated(KeyboardInterrupt):
    """The pipeline got SIGTERM (``kill <pid>``, ``docker stop``, Slurm's ``scancel`` or time limit): raised in the main
    thread by :func:`main`'s handler. A KeyboardInterrupt, so that papermill, nbclient and asyncio stop as for Ctrl-C
    (the kernel is shut down); the manifest records ``"stopped"`` and the process exits 143 (128 + SIGTERM)."""


class KernelDied(RuntimeError):
    """The notebook's kernel died (out of memory, or killed). ``str(err)`` says where and how to resume;
    ``notebook`` is the executed copy, which shows the same in the cell that was running."""

    def __init__(self, message: str, notebook: Path):
        super().__init__(message)
        self.notebook = notebook


def kernel_manager_class(log: Path | None = None):
    """The kernel manager papermill starts each notebook's kernel with: jupyter_client's own, over IPC sockets, its
    process output to a log file.

    jupyter_client's default transport is TCP on loopback, which any process on the machine can reach (rented GPU
    boxes are often shared), and ipykernel 7 warns about it in every headless run ("Kernel is running over TCP
    without encryption"). Unix-domain (IPC) sockets sit beside the kernel's connection file, in Jupyter's per-user
    runtime folder (mode 0700). Windows has no IPC transport there: TCP is kept.

    What a cell prints reaches the notebook over those sockets; the kernel process's own stdout and stderr (C
    libraries' messages, ipykernel's log, a crash dump) would otherwise go to the terminal, between the pipeline's
    lines. jupyter_client interrupts a kernel before shutting it down (``shutdown_kernel``), so at the end of a
    notebook ipykernel 7.4 can log "KeyboardInterrupt caught in kernel", and after Ctrl-C it can print a ZMQError
    traceback while its sockets close. ``log`` keeps all of that with the run instead.

    Args:
        log: append the kernel process's stdout and stderr to this file (None: inherit the terminal's).

    Returns:
        A subclass of ``jupyter_client.manager.AsyncKernelManager`` (nbclient's default) whose ``transport``
        defaults to ``"ipc"`` (``"tcp"`` on Windows).
    """
    import subprocess

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self) -> str:
            return "tcp" if os.name == "nt" else "ipc"

        async def start_kernel(self, **kw):
            if log is None or "stdout" in kw or "stderr" in kw:
                return await super().start_kernel(**kw)
            with open(log, "ab") as fh:  # the kernel keeps its own copy of the descriptor
                return await super().start_kernel(stdout=fh, stderr=subprocess.STDOUT, **kw)

    return IPCKernelManager


def notebooks(folder: Path | None = None) -> list[Path]:
    """The pipeline's notebooks in run order (``NN_*.ipynb``)."""
    folder = folder or project_root() / "notebooks"
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def resolve_run(resume: str | Path) -> RunDir:
    """The run to continue: a run folder, or a run id under the outputs folder (``$MEDTUNE_OUTPUTS`` or outputs/).

    Raises:
        FileNotFoundError: no such run (names what was tried and where runs are).
    """
    path = Path(resume)
    if not (path / "config.yaml").is_file() and (outputs_root() / path.name / "config.yaml").is_file():
        path = outputs_root() / path.name
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"no run to resume at {path} (nor {outputs_root() / path.name}): give RESUME=<run-id> or "
            f"RESUME=outputs/<run-id> of an existing run; the runs are the folders under {outputs_root()}."
        )
    return RunDir.open(path)


# The first notebook that USES each setting: builds, loads, reads, trains or measures with it. 00 only checks settings
# (access, preflight), and a check is not a use: 00 runs again after a resume takes changed settings. A resumed run
# may take a changed setting only while the notebook that first uses it has not completed: the baseline (04) and the
# fine-tuned evaluation (06) must use the same generation and benchmark settings, the split (03) stays the one 04-06
# measured, and nothing already measured is re-labelled with settings it did not run with. Every RunConfig field but
# `profile` (the run's name) is listed; tests/pipeline/test_pipeline_failures.py checks that.
FIRST_USED_BY = {
    **dict.fromkeys(("model", "model_revision", "source", "hub_endpoint", "device", "quantization", "llama4_fast",
                     "rehearsal"),
                    "01_load_quantized_model.ipynb"),
    **dict.fromkeys(("dataset", "dataset_config", "dataset_split", "dataset_source", "max_rows", "columns", "bad_rows",
                     "language", "heldout_rows", "heldout_size", "seed"), "03_format_prompts.ipynb"),
    **dict.fromkeys(("max_new_tokens", "generation_batch_size", "eval_batch_size", "eval_questions", "benchmarks",
                     "benchmark_limit", "benchmark_mode", "benchmark_harness"), "04_baseline.ipynb"),
    **dict.fromkeys(("lora", "sft", "loss_on", "num_processes"), "05_train_lora.ipynb"),
    **dict.fromkeys(("push", "hub_repo_id", "hub_private", "push_to", "export_merged"), "07_push.ipynb"),
}
# Keys of a section that an earlier notebook already uses: 03 drops rows longer than sft.max_length (and 04 truncates
# the held-out loss to it), so a changed max_length counts from 03, other sft keys from 05.
FIRST_USED_BY_KEY = {("sft", "max_length"): "03_format_prompts.ipynb"}
CHECKS_ONLY = "00_authenticate.ipynb"


def _changes(old: dict, new: dict) -> dict[str, tuple]:
    """Top-level settings (``profile`` aside, it names the run) that differ: key -> (old value, new value)."""
    return {k: (old.get(k), new.get(k)) for k in dict.fromkeys([*old, *new])
            if k != "profile" and old.get(k) != new.get(k)}


def first_use(key: str, old, new) -> tuple[str, str]:
    """Which notebook first uses a changed setting, and the name to report it by.

    Args:
        key: a :class:`~medtune.settings.config.RunConfig` field. old, new: its two values.

    Returns:
        ``(notebook file name, label)``: from :data:`FIRST_USED_BY`, or for a section (``sft``) the earliest of its
        changed keys' (:data:`FIRST_USED_BY_KEY`), labelled ``sft.max_length``; 00 for a key not listed.
    """
    first, label = FIRST_USED_BY.get(key, CHECKS_ONLY), key
    if isinstance(old, dict) and isinstance(new, dict):
        changed = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
        for sub in changed:
            earlier = FIRST_USED_BY_KEY.get((key, sub))
            if earlier and earlier < first:
                first, label = earlier, f"{key}.{sub}"
    return first, label


def update_resumed_config(run: RunDir, params: str | Path) -> list[str]:
    """Give a resumed run the settings of ``params`` where that is still sound, e.g. ``bad_rows: skip`` after 03
    refused over-long rows, or a fixed ``sft`` section after 05 failed on it: every changed setting must be first used
    by a notebook that has not completed (:func:`first_use`; 00 only checks settings, which is no use), and 05's
    settings only while it has no checkpoint. The run's previous ``config.yaml`` is kept as ``config.<UTC
    time>.yaml`` and the change is recorded in ``metrics.json`` (section ``pipeline``, ``config_changes``). 00 is
    marked not completed, so the resumed run checks the new settings again before anything else runs (its earlier
    executed copy is kept as ``notebooks/00_authenticate.<UTC time>.ipynb``).

    Returns:
        The changed keys (empty: the profile matches the run; nothing is written).

    Raises:
        ConfigError: a changed setting was already used by a completed notebook (or by 05's checkpoints); the
            message lists them and the two ways on: a new run with the profile, or RESUME without PARAMS.
    """
    import datetime as dt

    old, new = run.config(), _config.load(params)
    changes = _changes(old.to_dict(), new.to_dict())
    if not changes:
        return []
    done = set(run.metrics().get("pipeline", {}).get("completed", []))
    checkpoints = any(run.checkpoints_dir.glob("checkpoint-*")) if run.checkpoints_dir.is_dir() else False
    used = []
    for key, (before, after) in changes.items():
        first, label = first_use(key, before, after)
        if first in done and first != CHECKS_ONLY:
            used.append(f"{label} (used since {first.removesuffix('.ipynb')})")
        elif key in ("lora", "sft", "loss_on") and checkpoints:
            used.append(f"{key} (05 already wrote checkpoints with the old value)")
    if used:
        raise _config.ConfigError(
            f"{params} differs from run {run.run_id} in settings it already used: {', '.join(used)}. A run keeps "
            f"the settings its finished notebooks ran with. Either start a new run with this profile "
            f"(make run-all PARAMS={params}), or continue this run with its own settings (make run-all "
            f"RESUME={run.run_id}, without PARAMS)."
        )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run.config_path.rename(run.path / f"config.{stamp}.yaml")
    _config.dump(dataclasses.replace(new, profile=old.profile), run.config_path)  # the run id keeps its profile name
    record = run.metrics().get("pipeline", {}).get("config_changes", [])
    record.append({"at": stamp, "from": str(params), "keys": sorted(changes), "previous": f"config.{stamp}.yaml"})
    update: dict = {"config_changes": record}
    if CHECKS_ONLY in done:  # 00 checks the new settings again, before the notebooks still to run
        update["completed"] = sorted(done - {CHECKS_ONLY})
        executed = run.notebooks_dir / CHECKS_ONLY
        if executed.is_file():
            executed.rename(executed.with_name(f"{executed.stem}.{stamp}.ipynb"))
    run.record("pipeline", update)
    return sorted(changes)


def run_all(params: str | Path | None, resume: str | Path | None = None, notebooks_dir: Path | None = None,
            outputs: Path | None = None, *, report: bool = False) -> RunDir:
    """Execute all notebooks headless into one run: a new one, or ``resume`` when given (and only then).

    The run's ``manifest.json`` (:mod:`medtune.reports.manifest`) records the code, versions, hardware, data and
    times of each session, and how it ended: finished, failed in a notebook, interrupted (Ctrl-C) or stopped
    (SIGTERM, which :func:`main` turns into :class:`Terminated`). Each executed copy is tidied as papermill writes
    it, finished or not: every progress bar once, with its final line
    (:func:`medtune.reports.notebooks.coalesce_streams`). While a notebook runs, a :func:`heartbeat` line every
    :func:`heartbeat_interval` seconds.

    Args:
        params: profile YAML for a new run (None: params/default.yaml). With ``resume``: None continues with the
            run's own config.yaml; a profile is taken where still sound (:func:`update_resumed_config`).
        resume: an existing run to continue: its folder or its id (see :func:`resolve_run`).
        notebooks_dir: where the source notebooks are (default: the project's notebooks/).
        outputs: where new runs go (default: ``$MEDTUNE_OUTPUTS`` or outputs/).
        report: at the end, finished or not, write the run's HTML report and the index of runs
            (:func:`medtune.reports.render.write_report`); a report that cannot be written is a printed warning,
            never the run's error.

    Returns:
        The :class:`RunDir`.

    Raises:
        papermill.PapermillExecutionError: a cell failed (the executed copy shows it).
        KernelDied: the kernel died (the executed copy shows where, and how to resume).
        ConfigError: bad profile, a resumed run's profile changes settings it already used, or a bad
            ``$MEDTUNE_HEARTBEAT_S``.
        FileNotFoundError: no such run to resume.
        KeyboardInterrupt: Ctrl-C; :class:`Terminated` for SIGTERM (both with a note saying how to continue).
    """
    from medtune.reports import manifest

    beat = heartbeat_interval()  # a wrong $MEDTUNE_HEARTBEAT_S stops here, before a run is made
    if resume:
        run = resolve_run(resume)
        live = manifest.live_process(run)
        if live:  # two processes writing one run's checkpoints and notebooks would corrupt both
            raise RuntimeError(f"run {run.run_id} is still running (process {live.get('pid')} on this machine): "
                               "wait for it to finish, or stop it (Ctrl-C in its terminal, or kill that pid), then "
                               f"continue it with: make run-all RESUME={run.run_id}")
        if params is not None:
            changed = update_resumed_config(run, Path(params).resolve())
            if changed:
                print(f"run {run.run_id} continues with {params}: changed {', '.join(changed)} (previous settings "
                      f"kept beside config.yaml)", flush=True)
        used = Path(params).resolve() if params is not None else run.config_path
        params = run.config_path
    else:
        params = used = Path(params or project_root() / "params" / "default.yaml").resolve()
        run = RunDir.create(_config.load(params), outputs)
    books = notebooks(notebooks_dir)
    status, where, error, started = "failed", None, None, False
    try:
        # inside the try: Ctrl-C or SIGTERM while it gathers the environment (torch's import, git, nvidia-smi: seconds
        # on a GPU machine) must still say which run was made and how to continue it
        manifest.start(run, used, [nb.stem for nb in books], resumed=bool(resume))
        started = True
        _execute(run, params, books, resumed=bool(resume), beat=beat)
        status, where = "finished", None
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated): stopped on purpose, no cause to fix
        status = "stopped" if isinstance(err, Terminated) else "interrupted"
        error = type(err).__name__
        err.add_note(how_to_continue(run, books, interrupted=True))
        raise
    except BaseException as err:
        error = type(err).__name__
        if not isinstance(err, KernelDied):  # its message already says both
            err.add_note(how_to_continue(run, books))
        raise
    finally:
        with _signals_ignored():  # a second Ctrl-C or SIGTERM must not cut the manifest or the report short
            if status != "finished":
                stopped = _stopped_at(run, books)
                where = stopped.stem if stopped is not None else None
            if started:  # else this session never began: nothing of it to record (a new run has no manifest yet)
                manifest.finish(run, status, where, error)
            if report and (started or run.manifest_path.is_file()):
                report_run(run)
    return run


@contextlib.contextmanager
def _signals_ignored():
    """Ignore Ctrl-C and SIGTERM while the pipeline records how a run ended (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_STOPPING = threading.Event()  # set by SIGTERM and Ctrl-C while the pipeline runs: see _QuietAfterStop
# loggers that report the kernel's shutdown after a stop as errors: nbclient's (through papermill's logger) "Kernel
# died while waiting for execute reply", and asyncio's "Task exception was never retrieved" with a DeadKernelError
# traceback, depending on when the interrupted task is collected
_SHUTDOWN_LOGGERS = ("papermill", "asyncio")


class _QuietAfterStop(logging.Filter):
    """Drops the records of :data:`_SHUTDOWN_LOGGERS` once a run was stopped on purpose: the kernel's shutdown is
    what was asked for, and the pipeline prints what happened and how to continue itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _STOPPING.is_set()


def _terminate(signum, frame) -> None:
    _STOPPING.set()
    raise Terminated("SIGTERM")


def _interrupt(signum, frame) -> None:
    _STOPPING.set()
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as Ctrl-C always did


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c():
    """While the pipeline runs, SIGTERM raises :class:`Terminated` in the main thread, so the run ends as for
    Ctrl-C (recorded, reported, how to continue printed) instead of dying with the manifest still "running". The
    previous handler comes back afterwards; a SIGTERM the caller ignores (``SIG_IGN``) stays ignored, and outside
    the main thread (where Python cannot set handlers) nothing changes. After either signal the kernel's shutdown is
    not reported as an error (:class:`_QuietAfterStop`)."""
    quiet = _QuietAfterStop()
    for name in _SHUTDOWN_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    _STOPPING.clear()
    main = threading.current_thread() is threading.main_thread()
    handlers = {}
    try:
        if main and signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:
            handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _terminate)
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            handlers[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
        yield
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        for name in _SHUTDOWN_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)


def _stopped_at(run: RunDir, books: list[Path]) -> Path | None:
    """The first of ``books`` the run has not completed (``metrics.json``'s ``pipeline.completed``), or None."""
    try:
        completed = set(run.metrics().get("pipeline", {}).get("completed", []))
    except ValueError:  # a damaged metrics.json: the run's own error says so
        completed = set()
    return next((nb for nb in books if nb.name not in completed), None)


def how_to_continue(run: RunDir, books: list[Path], interrupted: bool = False) -> str:
    """Where the notebook that stopped a run is, and the command that continues the run (a note the pipeline adds
    to the exception, which ``main`` prints); ``interrupted``: Ctrl-C or SIGTERM, so there is no cause to fix
    first."""
    stopped = _stopped_at(run, books)
    executed = run.notebooks_dir / stopped.name if stopped is not None else None
    where = f"the executed notebook: {executed}\n" if executed is not None and executed.is_file() else ""
    then = "continue it" if interrupted else "after fixing the cause, continue it"
    return (f"{where}everything the run finished is kept in {run.path}; {then} with: "
            f"make run-all RESUME={run.run_id}")


def report_run(run: RunDir) -> Path | None:
    """Write the run's report and the index of runs beside it (:func:`medtune.reports.render.write_report`),
    printing where; a failure is printed as a warning (the run's own outcome matters more) and gives None."""
    from medtune.reports import render

    try:
        path = render.write_report(run)
    except Exception as err:  # the run's own error, if any, is the one to raise
        print(f"warning: the report could not be written: {type(err).__name__}: {err}. Try again with "
              f"make report RUN={run.path}", file=sys.stderr, flush=True)
        return None
    print(f"report: {path} (all runs: {run.path.parent / 'index.html'})", flush=True)
    return path


def _execute(run: RunDir, params: Path, books: list[Path], *, resumed: bool, beat: float = 0) -> None:
    """Run each of ``books`` not yet completed into the run (see :func:`run_all`), with a :func:`heartbeat` line
    every ``beat`` seconds (0: none)."""
    import papermill
    from nbclient.exceptions import DeadKernelError

    from medtune.reports import notebooks as executed_copies

    run.notebooks_dir.mkdir(exist_ok=True)
    done = set(run.metrics().get("pipeline", {}).get("completed", []))
    # The kernel must be this environment's Python: put it first on PATH for the kernel papermill starts.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    os.environ["MEDTUNE_HEADLESS"] = "1"  # quieter progress bars in the executed notebooks (see medtune/__init__)
    print(f"{'continuing' if resumed else 'new'} run: {run.path}", flush=True)
    for nb in books:
        if nb.name in done:
            print(f"  {nb.stem:<28} done earlier, skipped", flush=True)
            continue
        start = time.perf_counter()
        print(f"  {nb.stem:<28} running ...", flush=True)
        executed = run.notebooks_dir / nb.name
        try:
            # python3: this environment's own kernel (ipykernel's, argv "python" -> sys.executable), not the notebooks'
            # "medtune" kernel (medtune.lab), which JupyterLab needs but a headless run does not. The heartbeat reads
            # what the cells show as it arrives (stdout_file, stderr_file: streams only) and the copy papermill
            # saves while outputs arrive (every kind, at most every autosave_cell_every seconds: its default 30, less
            # for a shorter heartbeat); the kernel.log gets only the kernel process's own output, no cell's.
            with heartbeat(nb.stem, executed, beat) as printed:
                papermill.execute_notebook(
                    str(nb), str(executed),
                    parameters={"PARAMS": str(params), "RUN_DIR": str(run.path)},
                    kernel_name="python3", cwd=str(nb.parent), progress_bar=False, log_output=False,
                    stdout_file=printed, stderr_file=printed,
                    autosave_cell_every=max(1, min(30, int(beat / 2))) if beat > 0 else 30,
                    kernel_manager_class=kernel_manager_class(run.notebooks_dir / f"{nb.stem}.kernel.log"),
                )
        except DeadKernelError as err:
            count = mark_dead_kernel(nb, executed, run)
            raise KernelDied(
                f"the kernel died in {nb.name}, cell In [{count}] ({err}): killed by the operating system, most "
                f"likely out of memory. The executed notebook shows where: {executed}. Resume: make run-all "
                f"RESUME={run.run_id}", executed,
            ) from None
        finally:  # finished or failed, the saved copy shows each progress bar once, as JupyterLab does
            if executed.is_file():
                try:
                    executed_copies.coalesce_streams(executed)
                except Exception as err:  # an untidy copy is no reason to hide the notebook's own outcome
                    print(f"warning: could not tidy {executed.name}: {type(err).__name__}: {err}", file=sys.stderr)
        done.add(nb.name)
        run.record("pipeline", {"completed": sorted(done)})
        print(f"  {nb.stem:<28} ok ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"done: executed notebooks in {run.notebooks_dir}, metrics in {run.metrics_path}")


HEARTBEAT_S = 60.0
"""Seconds between two heartbeat lines while a notebook runs; ``$MEDTUNE_HEARTBEAT_S`` overrides it, 0 turns it off."""
HEARTBEAT_MIN_S = 1.0
"""The shortest interval ``$MEDTUNE_HEARTBEAT_S`` may set (0 aside: off)."""
HEARTBEAT_CHARS = 150
"""The most characters of a notebook's latest output a heartbeat line repeats."""
HEARTBEAT_HEAD = 60
"""Of a longer output, the characters kept from its start (the rest from its end, where a loss table's last step is)."""
# Terminal escape sequences (colours, cursor moves, window titles; 8-bit CSI; the two- and three-character ones such
# as tput sgr0's ESC ( B or ESC 7), and the control characters left after them: C0, DEL, C1 and the bidirectional
# overrides that would reorder the rest of the line
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
                      r"|\x1b[ -/]*[0-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_HIDDEN_HTML = re.compile(r"<(style|script)\b.*?</\1\s*>", re.S | re.I)


def heartbeat_interval() -> float:
    """Seconds between heartbeat lines: ``$MEDTUNE_HEARTBEAT_S`` when set, else :data:`HEARTBEAT_S`; 0 is off.

    Raises:
        ConfigError: the variable is not a number of seconds, 0 or at least :data:`HEARTBEAT_MIN_S` (the message
            says what to set).
    """
    raw = os.environ.get("MEDTUNE_HEARTBEAT_S", "").strip()
    if not raw:
        return HEARTBEAT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise _config.ConfigError(f"MEDTUNE_HEARTBEAT_S={raw!r} is not a number of seconds: set it to e.g. 60 (a "
                                  "line every minute while a notebook runs), or 0 to turn the heartbeat off")
    if 0 < seconds < HEARTBEAT_MIN_S:
        raise _config.ConfigError(f"MEDTUNE_HEARTBEAT_S={raw!r} is under {HEARTBEAT_MIN_S:g} s: a line that often "
                                  "would flood the terminal (and reread the notebook as often); set it to e.g. 60, "
                                  "or 0 to turn the heartbeat off")
    return seconds


def last_line(text: str) -> str:
    """What a terminal would show last of ``text``: its last non-empty line, and of that line the part after its
    last carriage return (a tqdm bar redraws itself with ``\\r``), without terminal escape sequences or control
    characters, tabs as spaces, trimmed."""
    text = _ESCAPES.sub("", text)
    for line in reversed(text.split("\n")):
        for segment in reversed(line.split("\r")):
            segment = _CONTROLS.sub("", segment.replace("\t", " ")).strip()
            if segment:
                return segment
    return ""


def _output_text(output: dict) -> str:
    """The latest line one notebook output shows (:func:`last_line`): a stream's text, an error's name and value,
    a display's plain text, or, for HTML shown as ``<... object>`` (the Trainer's progress bar and loss table), the
    HTML's text on one line."""
    def joined(value) -> str:
        return "".join(value) if isinstance(value, list) else str(value or "")

    kind = output.get("output_type")
    if kind == "stream":
        return last_line(joined(output.get("text")))
    if kind == "error":
        return last_line(f"{output.get('ename', '')}: {output.get('evalue', '')}")
    data = output.get("data") or {}
    plain = last_line(joined(data.get("text/plain")))
    if "text/html" in data and (not plain or re.fullmatch(r"<.* object>", plain)):
        import html

        text = re.sub(r"</?[A-Za-z!][^>]*>", " ", _HIDDEN_HTML.sub(" ", joined(data["text/html"])))
        return " ".join(last_line(html.unescape(text).replace("\n", " ")).split())
    return plain


def latest_output(executed: Path) -> tuple[int, str] | None:
    """The cell a notebook is running and the latest line it showed, read from the copy papermill saves while it runs
    (at each cell's start and end, and while outputs arrive, at most every ``autosave_cell_every`` seconds).

    Returns:
        ``(execution count, latest line or "")`` of the cell papermill marked running; None when no cell is
        (between cells, at the end) or the copy cannot be read (not written yet, or being written).
    """
    import json

    try:
        cells = json.loads(executed.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError, AttributeError):
        return None
    code = [c for c in cells if isinstance(c, dict) and c.get("cell_type") == "code"]
    running = [c for c in code if (c.get("metadata") or {}).get("papermill", {}).get("status") == "running"]
    if not running:
        return None
    cell = running[-1]
    # saved at the cell's start, before the kernel numbered it: cells run in order in a fresh kernel
    count = cell.get("execution_count") or code.index(cell) + 1
    for output in reversed(cell.get("outputs") or []):
        text = _output_text(output) if isinstance(output, dict) else ""
        if text:
            return count, text
    return count, ""


def _duration(seconds: float) -> str:
    """``"45 s"``, ``"28 min 03 s"``, ``"2 h 05 min"``."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Printed:
    """What a running notebook printed last: papermill's ``stdout_file`` and ``stderr_file``, to which it copies each
    stream output (print, a tqdm bar's refresh) as the kernel sends it. Keeps only ``latest``: ``(time.time() when
    it arrived, its :func:`last_line`)``, ``(0.0, "")`` before any; read by the heartbeat thread."""

    def __init__(self):
        self.latest: tuple[float, str] = (0.0, "")

    def write(self, text: str) -> None:
        line = last_line(text)
        if line:
            self.latest = (time.time(), line)  # one assignment: the reading thread sees the old pair or the new

    def flush(self) -> None:
        pass


def heartbeat_line(name: str, elapsed: float, executed: Path, since: float | None = None,
                   printed: tuple[float, str] | None = None) -> str:
    """The line the heartbeat prints: the notebook, how long it has run, the cell it runs and the latest line it
    showed, at most :data:`HEARTBEAT_CHARS` of it, e.g. ``"  05_train_lora                running 28 min 03 s,
    In [7]: [ 35/40 26:12 < 03:44, 0.02 it/s, Epoch 0.88/1]"``.

    The latest line is the newer of two: the running cell's last output in the executed copy (:func:`latest_output`;
    every kind of output, the Trainer's HTML bar too, but saved only as outputs arrive, at most every
    ``autosave_cell_every`` seconds), and ``printed``, the last stream line as it arrived (:class:`Printed`; a line
    printed before a long silence is in no saved copy yet).

    Args:
        name: the notebook's name without ``.ipynb``. elapsed: seconds since it started.
        executed: its executed copy. since: a copy last written before this time (as ``time.time()``) is an
            earlier run's and is not read. printed: :attr:`Printed.latest`.
    """
    line = f"  {name:<28} running {_duration(elapsed)}"
    try:
        saved = executed.stat().st_mtime
    except OSError:
        saved = None
    if saved is not None and since is not None and saved < since:
        saved = None
    latest = latest_output(executed) if saved is not None else None
    count, text = latest if latest is not None else (None, "")
    if printed and printed[1] and printed[0] > (saved if saved is not None else since or 0.0):
        text = printed[1]  # printed after the copy was saved: newer than anything in it
    if latest is None and not text:
        return line
    cell = f", In [{count}]" if count is not None else ""
    if not text:
        return f"{line}{cell} (no output yet)"
    if len(text) > HEARTBEAT_CHARS:  # its start (the Trainer's bar) and its end (the loss table's latest step)
        keep = HEARTBEAT_CHARS - HEARTBEAT_HEAD - 5
        tail = text[-keep:]
        if text[-keep - 1] != " " and " " in tail:  # begin at a whole word, not inside a number
            tail = tail.split(" ", 1)[1]
        text = text[:HEARTBEAT_HEAD].rstrip() + " ... " + tail.lstrip()
    return f"{line}{cell}: {text}"


@contextlib.contextmanager
def heartbeat(name: str, executed: Path, interval: float, out=None):
    """While the ``with`` block runs a notebook, print :func:`heartbeat_line` every ``interval`` seconds from a
    background thread, so that a long notebook (05's training: half an hour) is seen working; the thread stops
    when the block ends, however it ends (finished, failed, Ctrl-C, SIGTERM). A block shorter than ``interval``
    prints nothing.

    Args:
        name: the notebook's name without ``.ipynb``. executed: its executed copy.
        interval: seconds between lines; 0 (or less) prints none. out: where to print (default: ``sys.stdout`` at
            the time of each line).

    Yields:
        A :class:`Printed` for papermill's ``stdout_file`` and ``stderr_file`` (None when the heartbeat is off).
    """
    if interval <= 0:
        yield None
        return
    start, since, stop, printed = time.perf_counter(), time.time(), threading.Event(), Printed()
    wait = min(interval, threading.TIMEOUT_MAX)  # longer: OverflowError in Event.wait (1e10 s is no heartbeat anyway)

    def beat() -> None:
        while not stop.wait(wait):
            try:
                line = heartbeat_line(name, time.perf_counter() - start, executed, since, printed.latest)
                stream = out or sys.stdout
                encoding = getattr(stream, "encoding", None) or "utf-8"
                line = line.encode(encoding, "replace").decode(encoding)  # a tqdm bar's blocks in an ASCII terminal
                if not stop.is_set():
                    print(line, file=stream, flush=True)
            except Exception:  # a missed heartbeat must never disturb the run
                pass

    thread = threading.Thread(target=beat, name=f"heartbeat {name}", daemon=True)
    thread.start()
    try:
        yield printed
    finally:
        stop.set()
        thread.join(timeout=5)


def dead_kernel_message(run: RunDir) -> str:
    """What the executed notebook says when its kernel died: the likely cause, how to resume, how to need less."""
    return (
        "The kernel died while running this cell: the operating system killed it, most likely because it ran out of "
        "memory (host RAM; on a GPU the CUDA out-of-memory error would show as a normal error instead). Everything "
        f"this run finished is kept in {run.path}, including training checkpoints. To continue this run: "
        f"`make run-all RESUME={run.run_id}` (or `python -m medtune.pipeline --resume {run.path}`); completed "
        "notebooks are skipped and training resumes from its last checkpoint. To need less memory: lower "
        "sft.max_length, eval_batch_size or generation_batch_size, or use a machine with more RAM."
    )


def mark_dead_kernel(source: Path, executed: Path, run: RunDir) -> int | str:
    """Make the executed notebook show that its kernel died, in the cell that was running, and at the top.

    papermill 2.7 writes the executed copy when nbclient raises ``DeadKernelError`` but shows no error in it: the
    cell that was running has no output and every cell is marked "completed". This adds an error output to that
    cell (the last code cell papermill started), marks it failed and the cells after it
    pending, and puts a red banner first, as papermill does for a failing cell. When no executed copy was written
    (the kernel died while starting), the source notebook is copied with the banner.

    Returns:
        The execution count of the cell that was running (``"?"`` if unknown).
    """
    import nbformat
    from nbformat.v4 import new_markdown_cell, new_output

    nb = nbformat.read(executed if executed.is_file() else source, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # papermill stamps a cell's start_time before sending it to the kernel; the last one stamped was running
    started = [c for c in code if c.metadata.get("papermill", {}).get("start_time")]
    dead = started[-1] if started else (code[0] if code else None)
    text = dead_kernel_message(run)
    count: int | str = "?"
    if dead is not None:
        count = dead.get("execution_count") or code.index(dead) + 1  # cells run in order in a fresh kernel
        dead.outputs.append(new_output("error", ename="DeadKernelError", evalue=text,
                                       traceback=[f"DeadKernelError: {text}"]))
        dead.metadata.setdefault("papermill", {}).update(status="failed", exception=True)
        after = code[code.index(dead) + 1:]
        for c in after:
            c.metadata.setdefault("papermill", {})["status"] = "pending"
        nb.cells.insert(nb.cells.index(dead), new_markdown_cell(
            '<span id="papermill-error-cell" style="color:red; font-family:Helvetica Neue, Helvetica, Arial, '
            'sans-serif; font-size:2em;">The kernel died here (likely out of memory).</span>'))
    nb.cells.insert(0, new_markdown_cell(
        '<span style="color:red; font-family:Helvetica Neue, Helvetica, Arial, sans-serif; font-size:2em;">'
        f"The kernel died at '<a href=\"#papermill-error-cell\">In [{count}]</a>'.</span>\n\n{text}"))
    nb.metadata.setdefault("papermill", {})["exception"] = True
    executed.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, executed)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medtune.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=None,
                        help="profile YAML (default: params/default.yaml; with --resume: the run's own settings)")
    parser.add_argument("--resume", default=None, help="continue this run: outputs/<run-id> or the run id")
    parser.add_argument("--notebooks-dir", default=None, type=Path,
                        help="run the NN_*.ipynb of this folder instead of the project's notebooks/")
    parser.add_argument("--no-report", action="store_true",
                        help="do not write the HTML report at the end (make report writes it later)")
    args = parser.parse_args(argv)
    if args.resume is not None and not args.resume.strip():  # e.g. --resume "$RUN" with RUN unset
        print("error: --resume is empty: give the run to continue, outputs/<run-id> or its id "
              "(without --resume a new run starts)", file=sys.stderr)
        return 2
    from papermill.exceptions import PapermillExecutionError

    try:
        with _sigterm_stops_like_ctrl_c():
            run_all(args.params, resume=args.resume, notebooks_dir=args.notebooks_dir, report=not args.no_report)
    except _config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PapermillExecutionError as err:
        from medtune.reports.notebooks import plain

        _say(f"notebook failed in cell {err.exec_count}: {plain(err.ename)}: {plain(err.evalue)}", err)
        return 1
    except KernelDied as err:
        _say(str(err), err)
        return 1
    except Terminated as err:  # SIGTERM: as Ctrl-C, with the shell's code for it
        _say("stopped by SIGTERM (kill, docker stop or the job scheduler)", err)
        return 143
    except KeyboardInterrupt as err:  # Ctrl-C: what to do next, not papermill's and asyncio's tracebacks
        _say("interrupted (Ctrl-C)", err)
        return 130
    except Exception as err:  # a missing run to resume and the like: say so, exit non-zero
        _say(f"{type(err).__name__}: {err}", err)
        return 1
    return 0


def _say(message: str, err: BaseException) -> None:
    """Print a run's error and the notes the pipeline added to it (where the notebook is, how to continue)."""
    print(f"\nerror: {message}", file=sys.stderr)
    for note in getattr(err, "__notes__", []):
        print(note, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
