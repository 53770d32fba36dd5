"""Run against run (``make compare RUNS="outputs/a outputs/b"``): the settings that differ, the code, versions and
hardware that differ, and every metric of both runs side by side with the difference B minus A; as Markdown for
the terminal and as an HTML page (with both training-loss curves in one matplotlib figure).
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from medtune.reports import manifest as _manifest
from medtune.reports import render, tables
from medtune.settings.runs import RunDir

# The manifest entries compared (path in manifest.json -> label); packages are compared one by one.
ENVIRONMENT = (
    (("code", "git_commit"), "git commit"),
    (("code", "git_dirty"), "uncommitted changes"),
    (("python", "version"), "Python"),
    (("hardware", "device"), "device"),
    (("hardware", "cuda_torch"), "CUDA (torch build)"),
    (("hardware", "cuda_driver"), "CUDA (driver)"),
    (("dataset", "train_rows", "rows"), "rows trained on"),
    (("dataset", "train_rows", "sha256"), "rows trained on, sha256"),
    (("profile", "sha256"), "profile sha256"),
    (("config_sha256",), "config.yaml sha256"),
)


@dataclass(frozen=True)
class Comparison:
    """Two runs side by side. ``settings`` and ``environment``: ``(key, A's value, B's value)`` for what differs
    (values as text); ``metrics``: :class:`~medtune.reports.tables.MetricRow` s with ``first`` A's value, ``second``
    B's and ``difference`` B minus A; ``status``: each run's status text."""

    a: RunDir
    b: RunDir
    settings: list[tuple[str, str, str]]
    environment: list[tuple[str, str, str]]
    metrics: list[tables.MetricRow]
    status: tuple[str, str]


# What decides the held-out questions when a run's data/heldout.jsonl cannot be read (a run stopped before 03): the
# settings that choose the rows. When both files exist their sha256 decides instead, which also catches a dataset
# that changed under the same settings.
HELDOUT_SET_KEYS = ("dataset", "dataset_config", "dataset_split", "columns", "max_rows", "bad_rows", "heldout_rows",
                    "heldout_size", "seed")
# What changes the measurement on the same questions: the template's language, which tokens count, the truncation.
MEASURE_KEYS = ("language", "loss_on", "sft.max_length")
# What also shapes the generated answers (their length, EOS share, ROUGE-L).
ANSWER_KEYS = ("eval_questions", "max_new_tokens")
SET_METRICS = ("loss", "perplexity")


def _missing(value, absent: str = "(not in config.yaml)") -> str:
    return absent if value is None else tables.show(value)


def settings_diff(a: dict, b: dict) -> list[tuple[str, str, str]]:
    """The settings that differ between two config dicts, nested sections flattened (``sft.learning_rate``), in
    A's key order then B's; a key only one run has shows ``(not set)`` for the other (a key set to null and a key
    not written both mean the default, and are not a difference).

    Returns:
        ``(key, A's value, B's value)`` with the values as text (:func:`medtune.reports.tables.show`).
    """
    fa, fb = tables.flatten(a), tables.flatten(b)
    return [(k, _missing(fa.get(k)), _missing(fb.get(k))) for k in dict.fromkeys([*fa, *fb]) if fa.get(k) != fb.get(k)]


def _differ(fa: dict, fb: dict, keys) -> list[str]:
    """The settings among ``keys`` (flattened names; a key also covers its sub-keys) whose values differ."""
    return [k for k in keys if {n: v for n, v in fa.items() if n == k or n.startswith(k + ".")}
            != {n: v for n, v in fb.items() if n == k or n.startswith(k + ".")}]


def not_comparable(cfg_a: dict, cfg_b: dict, metrics_a: dict, metrics_b: dict,
                   heldout_a: str | None = None, heldout_b: str | None = None) -> dict[str, str]:
    """Why a metric of run A is not the same measurement as run B's, so that a difference is no improvement or
    regression: the held-out questions differ (the sha256 of each run's data/heldout.jsonl, or, without both files,
    :data:`HELDOUT_SET_KEYS`), they are measured differently (:data:`MEASURE_KEYS`; for the answers' metrics also
    :data:`ANSWER_KEYS`), or a benchmark's source, item count, scoring mode or prompt language differ (in
    ``generate`` mode also ``max_new_tokens``).

    Args:
        cfg_a, cfg_b: the runs' settings (config.yaml). metrics_a, metrics_b: their metrics.json.
        heldout_a, heldout_b: sha256 of each run's data/heldout.jsonl, None where it cannot be read.

    Returns:
        ``{metrics.json key: reason}`` for each 04/06 metric that is not comparable, e.g.
        ``{"finetuned.loss": "heldout_size differs", "baseline.benchmarks.medqa.accuracy": "items (8, 100) differs"}``.
    """
    fa, fb = tables.flatten(cfg_a), tables.flatten(cfg_b)
    if heldout_a and heldout_b:
        by_set = ["held-out questions (data/heldout.jsonl)"] if heldout_a != heldout_b else []
    else:
        by_set = _differ(fa, fb, HELDOUT_SET_KEYS)
    by_set += _differ(fa, fb, MEASURE_KEYS)
    by_answers = by_set + _differ(fa, fb, ANSWER_KEYS)
    out = {}
    for stage, _ in STAGES:
        for _, key, _ in tables.HELDOUT_METRICS:
            keys = by_set if key in SET_METRICS else by_answers
            if keys:
                out[f"{stage}.{key}"] = _reason(keys)
        sa, sb = _section(metrics_a, stage), _section(metrics_b, stage)
        ba, bb = _section(sa, "benchmarks"), _section(sb, "benchmarks")
        for name in tables.benchmark_names(sa, sb):
            ea, eb = _section(ba, name), _section(bb, name)
            why = _differ(fa, fb, (f"benchmarks.{name}", "benchmark_limit"))
            why += [f"{field} ({ea.get(field)}, {eb.get(field)})" for field in ("items", "mode", "language")
                    if ea.get(field) != eb.get(field) and ea and eb]
            if "generate" in (ea.get("mode"), eb.get("mode")):
                why += _differ(fa, fb, ("max_new_tokens",))
            if why:
                out[f"{stage}.benchmarks.{name}.accuracy"] = _reason(why)
    return out


def _reason(keys: list[str]) -> str:
    return f"{', '.join(keys)} differ{'s' if len(keys) == 1 else ''}"


def _section(data, key: str) -> dict:
    """``data[key]`` when both are dicts, else ``{}`` (a damaged or hand-edited file reads as missing)."""
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def _sha256(path: Path) -> str | None:
    """:func:`medtune.reports.manifest.file_sha256`, None where the file cannot be read."""
    try:
        return _manifest.file_sha256(path)
    except OSError:
        return None


def _dig(data: dict, path: tuple[str, ...]):
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def environment_diff(a: dict, b: dict) -> list[tuple[str, str, str]]:
    """What differs between two manifests: commit, dirty flag, Python, device, CUDA, GPUs, the rows trained on,
    the profile and config hashes, and each package whose version differs.

    Returns:
        ``(label, A's value, B's value)`` as text; empty when either run has no manifest (the page says so).
    """
    if not (a and b):
        return []
    out = []
    for path, label in ENVIRONMENT:
        x, y = _dig(a, path), _dig(b, path)
        if x != y:
            out.append((label, _missing(x, "(not recorded)"), _missing(y, "(not recorded)")))
    gpus = [", ".join(g.get("name", "?") for g in (m.get("hardware") or {}).get("gpus") or []) or "none"
            for m in (a, b)]
    if gpus[0] != gpus[1]:
        out.append(("GPUs", gpus[0], gpus[1]))
    pa, pb = a.get("packages") or {}, b.get("packages") or {}
    for name in sorted(set(pa) | set(pb)):
        if name in pa and name in pb and pa[name] is None and pb[name] is None:
            continue
        if name in OPTIONAL_TOOLS and (pa.get(name) is None or pb.get(name) is None):
            continue  # JupyterLab in one environment and not the other does not change a headless run
        if pa.get(name) != pb.get(name):
            out.append((f"package {name}", pa.get(name) or "not installed", pb.get(name) or "not installed"))
    return out


# Packages the manifest lists that a headless run does not use: installed in one run's environment and not the
# other's, they are no difference (a different version of one still is).
OPTIONAL_TOOLS = ("jupyterlab",)

STAGES = (("baseline", "baseline (04)"), ("finetuned", "fine-tuned (06)"))


def metric_diff(a: dict, b: dict, apart: dict[str, str] | None = None) -> list[tables.MetricRow]:
    """Every metric either run recorded, A against B.

    Args:
        a, b: the two runs' metrics.json. apart: :func:`not_comparable`'s reasons; such a row keeps its difference
            but has no better/worse (``better`` None) and its label says why.

    Returns:
        :class:`~medtune.reports.tables.MetricRow` s (``first`` A, ``second`` B, ``difference`` B minus A): for 04
        then 06 the held-out metrics and each benchmark's accuracy, then 05's training figures, then the total wall
        time of the notebooks (seconds); keys are metrics.json paths (``finetuned.loss``,
        ``baseline.benchmarks.<name>.accuracy``, ``train.steps``, ``resources.total_wall_s``).
    """
    rows = []

    apart = apart or {}

    def add(path: tuple[str, ...], label: str, better: str | None) -> None:
        x, y = _dig(a, path), _dig(b, path)
        key = ".".join(path)
        if key in apart:
            label, better = f"{label} (not comparable: {apart[key]})", None
        if x is not None or y is not None:
            rows.append(tables.MetricRow(label, key, x, y, tables.difference(x, y), better))

    for stage, name in STAGES:
        for label, key, better in tables.HELDOUT_METRICS:
            add((stage, key), f"{name}: {label}", better)
        for bench in tables.benchmark_names(a.get(stage) or {}, b.get(stage) or {}):
            add((stage, "benchmarks", bench, "accuracy"), f"{name}: {bench} accuracy", "higher")
    for label, key in tables.TRAIN_METRICS:
        add(("train", key), f"training (05): {label}", None)
    totals = [round(sum(r.get("wall_s", 0) for r in (m.get("resources") or {}).values()), 3) or None for m in (a, b)]
    if any(totals):
        rows.append(tables.MetricRow("notebooks' total wall time (s)", "resources.total_wall_s", totals[0],
                                     totals[1], tables.difference(*totals), "lower"))
    return rows


def compare_runs(a: RunDir, b: RunDir) -> Comparison:
    """The :class:`Comparison` of run ``a`` (A) and run ``b`` (B).

    Raises:
        ValueError: ``a`` and ``b`` are the same run folder.
    """
    if a.path.resolve() == b.path.resolve():
        raise ValueError(f"both runs are {a.path}: compare two different runs, RUNS=\"outputs/<a> outputs/<b>\".")
    ma, mb = _manifest.read(a), _manifest.read(b)
    sa, sb, xa, xb = tables.settings(a), tables.settings(b), a.metrics(), b.metrics()
    apart = not_comparable(sa, sb, xa, xb, _sha256(a.heldout_path), _sha256(b.heldout_path))
    return Comparison(a, b, settings_diff(sa, sb), environment_diff(ma, mb), metric_diff(xa, xb, apart),
                      (_manifest.status(a).text, _manifest.status(b).text))


def _cell(value) -> str:
    text = "-" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(cmp: Comparison) -> str:
    """The comparison as Markdown (what ``make compare`` prints): the two runs, the settings that differ, the
    environment that differs, and the metrics with the difference B minus A."""
    lines = [f"# {cmp.a.run_id} (A) against {cmp.b.run_id} (B)", "",
             f"- A: {cmp.a.path} ({cmp.status[0]})", f"- B: {cmp.b.path} ({cmp.status[1]})", "",
             "## Settings that differ", ""]
    if cmp.settings:
        lines += ["| setting | A | B |", "|---|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(x)} | {_cell(y)} |" for k, x, y in cmp.settings]
    else:
        lines.append("None: both runs have the same settings.")
    lines += ["", "## Code, versions, hardware and data that differ", ""]
    if cmp.environment:
        lines += ["| | A | B |", "|---|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(x)} | {_cell(y)} |" for k, x, y in cmp.environment]
    elif not (_manifest.read(cmp.a) and _manifest.read(cmp.b)):
        lines.append("Not compared: a run has no manifest.json (not started by make run-all).")
    else:
        lines.append("None: same commit, versions, hardware, rows and profile.")
    lines += ["", "## Metrics (difference: B minus A)", ""]
    if cmp.metrics:
        lines += ["| metric | A | B | B - A |", "|---|---:|---:|---:|"]
        lines += [f"| {_cell(r.label)} | {_cell(render.short(r.first))} | {_cell(render.short(r.second))} | "
                  f"{tables.signed(r.difference)} |" for r in cmp.metrics]
    else:
        lines.append("Neither run has recorded metrics yet.")
    return "\n".join(lines) + "\n"


def loss_curves_png(cmp: Comparison) -> bytes | None:
    """Both runs' training loss per optimizer step (their ``train_log.json``) in one matplotlib figure, as PNG bytes;
    None when neither run has a training log."""
    from matplotlib.figure import Figure

    curves = []
    for tag, run in (("A", cmp.a), ("B", cmp.b)):
        if run.train_log_path.is_file():
            history = json.loads(run.train_log_path.read_text(encoding="utf-8"))
            points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
            if points:
                curves.append((f"{tag}: {run.run_id}", points))
    if not curves:
        return None
    fig = Figure(figsize=(7, 3.4))
    ax = fig.subplots()
    for label, points in curves:
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("LoRA SFT training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def default_path(cmp: Comparison) -> Path:
    """Where :func:`write_html` writes by default: ``compare-<A id>-vs-<B id>.html`` in A's parent folder
    (outputs/)."""
    return cmp.a.path.parent / f"compare-{cmp.a.run_id}-vs-{cmp.b.run_id}.html"


def write_html(cmp: Comparison, path: str | Path | None = None) -> Path:
    """Write the comparison as an HTML page (template ``compare.html.j2``) that opens from a file: the loss curves
    embedded, links to both runs' reports (relative) where they exist.

    Args:
        cmp: the comparison. path: the page (default: :func:`default_path`).

    Returns:
        The page's path.
    """
    path = Path(path) if path else default_path(cmp)
    png = loss_curves_png(cmp)
    links = {}
    for tag, run in (("A", cmp.a), ("B", cmp.b)):
        links[tag] = (Path(os.path.relpath(run.report_path, path.parent)).as_posix()
                      if run.report_path.is_file() else None)
    page = render.environment().get_template("compare.html.j2").render(
        cmp=cmp, links=links, has_manifests=bool(_manifest.read(cmp.a) and _manifest.read(cmp.b)),
        loss_curves=("data:image/png;base64," + base64.b64encode(png).decode("ascii")) if png else None)
    path.write_text(page, encoding="utf-8")
    return path
