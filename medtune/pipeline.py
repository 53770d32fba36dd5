"""Headless runs: every notebook, in order, through papermill into one run directory (``make run-all``).

``python -m medtune.pipeline --params params/default.yaml`` creates ``outputs/<run-id>/`` and executes
``notebooks/NN_*.ipynb`` into ``outputs/<run-id>/notebooks/``. A failing notebook stops the run; its executed copy
keeps the failing cell and its error, and the command exits non-zero. ``--resume <run-dir>`` continues a run:
notebooks that completed are skipped and training resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from medtune import config as _config
from medtune.runs import RunDir, project_root


def notebooks(folder: Path | None = None) -> list[Path]:
    """The pipeline's notebooks in run order (``NN_*.ipynb``)."""
    folder = folder or project_root() / "notebooks"
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def run_all(params: str | Path, resume: str | Path | None = None, notebooks_dir: Path | None = None,
            outputs: Path | None = None) -> RunDir:
    """Execute all notebooks headless into one run.

    Args:
        params: profile YAML for a new run (ignored with ``resume``: a run keeps its config.yaml).
        resume: an existing run directory to continue.
        notebooks_dir: where the source notebooks are (default: the project's notebooks/).
        outputs: where runs go (default: ``$MEDTUNE_OUTPUTS`` or outputs/).

    Returns:
        The :class:`RunDir`.

    Raises:
        papermill.PapermillExecutionError: a cell failed (the executed copy shows it).
        ConfigError: bad profile.
    """
    import papermill

    params = Path(params).resolve()
    run = RunDir.open(resume) if resume else RunDir.create(_config.load(params), outputs)
    run.notebooks_dir.mkdir(exist_ok=True)
    done = set(run.metrics().get("pipeline", {}).get("completed", []))
    # The kernel must be this environment's Python: put it first on PATH for the kernel papermill starts.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    os.environ["MEDTUNE_HEADLESS"] = "1"  # quieter progress bars in the executed notebooks (see medtune/__init__)
    print(f"run: {run.path}", flush=True)
    for nb in notebooks(notebooks_dir):
        if nb.name in done:
            print(f"  {nb.stem:<28} done earlier, skipped", flush=True)
            continue
        start = time.perf_counter()
        print(f"  {nb.stem:<28} running ...", flush=True)
        papermill.execute_notebook(
            str(nb), str(run.notebooks_dir / nb.name),
            parameters={"PARAMS": str(params), "RUN_DIR": str(run.path)},
            kernel_name="python3", cwd=str(nb.parent), progress_bar=False, log_output=False,
        )
        done.add(nb.name)
        run.record("pipeline", {"completed": sorted(done)})
        print(f"  {nb.stem:<28} ok ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"done: executed notebooks in {run.notebooks_dir}, metrics in {run.metrics_path}")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medtune.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params/default.yaml", help="profile YAML (default: %(default)s)")
    parser.add_argument("--resume", default=None, help="continue this run directory (outputs/<run-id>)")
    args = parser.parse_args(argv)
    from papermill.exceptions import PapermillExecutionError

    try:
        run_all(args.params, resume=args.resume)
    except _config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PapermillExecutionError as err:
        print(f"\nerror: notebook failed in cell {err.exec_count}: {err.ename}: {err.evalue}", file=sys.stderr)
        print("the executed notebook with the failing cell is in the run's notebooks/ folder (path above).", file=sys.stderr)
        return 1
    except Exception as err:  # a dead kernel (out of memory) and the like: say so, exit non-zero
        print(f"\nerror: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
