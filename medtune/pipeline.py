"""Headless runs: every notebook, in order, through papermill into one run directory (``make run-all``).

``python -m medtune.pipeline --params params/default.yaml`` creates a new ``outputs/<run-id>/`` (a new id every
time; no run is ever overwritten) and executes ``notebooks/NN_*.ipynb`` into ``outputs/<run-id>/notebooks/``. A
failing notebook stops the run; its executed copy keeps the failing cell and its error, and the command exits
non-zero. When the kernel dies (killed by the operating system, most often for memory), the executed copy says so
in the cell that was running, with how to resume. An existing run is continued only when asked:
``--resume <run-id or outputs/<run-id>>`` (``make run-all RESUME=...``) skips the notebooks that completed and
training resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from medtune import config as _config
from medtune.runs import RunDir, outputs_root, project_root


class KernelDied(RuntimeError):
    """The notebook's kernel died (out of memory, or killed). ``str(err)`` says where and how to resume;
    ``notebook`` is the executed copy, which shows the same in the cell that was running."""

    def __init__(self, message: str, notebook: Path):
        super().__init__(message)
        self.notebook = notebook


def kernel_manager_class():
    """The kernel manager papermill starts each notebook's kernel with: jupyter_client's own, over IPC sockets.

    jupyter_client's default transport is TCP on loopback, which any process on the machine can reach (rented GPU
    boxes are often shared), and ipykernel 7 warns about it in every headless run ("Kernel is running over TCP
    without encryption"). Unix-domain (IPC) sockets sit beside the kernel's connection file, in Jupyter's per-user
    runtime folder (mode 0700). Windows has no IPC transport there: TCP is kept.

    Returns:
        A subclass of ``jupyter_client.manager.AsyncKernelManager`` (nbclient's default) whose ``transport``
        defaults to ``"ipc"`` (``"tcp"`` on Windows).
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self) -> str:
            return "tcp" if os.name == "nt" else "ipc"

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


def run_all(params: str | Path, resume: str | Path | None = None, notebooks_dir: Path | None = None,
            outputs: Path | None = None) -> RunDir:
    """Execute all notebooks headless into one run: a new one, or ``resume`` when given (and only then).

    Args:
        params: profile YAML for a new run (ignored with ``resume``: a run keeps its config.yaml).
        resume: an existing run to continue: its folder or its id (see :func:`resolve_run`).
        notebooks_dir: where the source notebooks are (default: the project's notebooks/).
        outputs: where new runs go (default: ``$MEDTUNE_OUTPUTS`` or outputs/).

    Returns:
        The :class:`RunDir`.

    Raises:
        papermill.PapermillExecutionError: a cell failed (the executed copy shows it).
        KernelDied: the kernel died (the executed copy shows where, and how to resume).
        ConfigError: bad profile. FileNotFoundError: no such run to resume.
    """
    import papermill
    from nbclient.exceptions import DeadKernelError

    params = Path(params).resolve()
    run = resolve_run(resume) if resume else RunDir.create(_config.load(params), outputs)
    run.notebooks_dir.mkdir(exist_ok=True)
    done = set(run.metrics().get("pipeline", {}).get("completed", []))
    # The kernel must be this environment's Python: put it first on PATH for the kernel papermill starts.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    os.environ["MEDTUNE_HEADLESS"] = "1"  # quieter progress bars in the executed notebooks (see medtune/__init__)
    print(f"{'continuing' if resume else 'new'} run: {run.path}", flush=True)
    for nb in notebooks(notebooks_dir):
        if nb.name in done:
            print(f"  {nb.stem:<28} done earlier, skipped", flush=True)
            continue
        start = time.perf_counter()
        print(f"  {nb.stem:<28} running ...", flush=True)
        executed = run.notebooks_dir / nb.name
        try:
            papermill.execute_notebook(
                str(nb), str(executed),
                parameters={"PARAMS": str(params), "RUN_DIR": str(run.path)},
                kernel_name="python3", cwd=str(nb.parent), progress_bar=False, log_output=False,
                kernel_manager_class=kernel_manager_class(),
            )
        except DeadKernelError as err:
            count = mark_dead_kernel(nb, executed, run)
            raise KernelDied(
                f"the kernel died in {nb.name}, cell In [{count}] ({err}): killed by the operating system, most "
                f"likely out of memory. The executed notebook shows where: {executed}. Resume: make run-all "
                f"RESUME={run.run_id}", executed,
            ) from None
        done.add(nb.name)
        run.record("pipeline", {"completed": sorted(done)})
        print(f"  {nb.stem:<28} ok ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"done: executed notebooks in {run.notebooks_dir}, metrics in {run.metrics_path}")
    return run


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
    parser.add_argument("--params", default="params/default.yaml", help="profile YAML (default: %(default)s)")
    parser.add_argument("--resume", default=None, help="continue this run: outputs/<run-id> or the run id")
    parser.add_argument("--notebooks-dir", default=None, type=Path,
                        help="run the NN_*.ipynb of this folder instead of the project's notebooks/")
    args = parser.parse_args(argv)
    from papermill.exceptions import PapermillExecutionError

    try:
        run_all(args.params, resume=args.resume, notebooks_dir=args.notebooks_dir)
    except _config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PapermillExecutionError as err:
        print(f"\nerror: notebook failed in cell {err.exec_count}: {err.ename}: {err.evalue}", file=sys.stderr)
        print("the executed notebook with the failing cell is in the run's notebooks/ folder (path above).", file=sys.stderr)
        return 1
    except KernelDied as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a missing run to resume and the like: say so, exit non-zero
        print(f"\nerror: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
