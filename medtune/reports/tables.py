"""What the report pages show, as plain data (no HTML): the rows of each table, read from a run's files.

Every value is the one recorded (metrics.json, config.yaml, manifest.json, the answer files), never re-rounded, so a
page and its files agree; differences are computed here, fine-tuned minus baseline (one run) or B minus A (two runs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from medtune.settings.runs import RunDir

# The held-out metrics 04 and 06 record, with the labels of 06's table (medtune.evaluation.heldout.metrics_table) and
# which way is better ("lower", "higher", or None where neither is: an answer's length).
HELDOUT_METRICS = (
    ("response loss (nats/token, lower is better)", "loss", "lower"),
    ("perplexity (lower is better)", "perplexity", "lower"),
    ("mean answer length (tokens)", "mean_new_tokens", None),
    ("share stopped with EOS", "stopped_with_eos", "higher"),
    ("ROUGE-L F1, answer vs reference Response", "rouge_l", "higher"),
    ("mean answer length (characters after </think>)", "mean_answer_chars", None),
    ("share following the template", "template_share", "higher"),
)
# What 05 records about training ("train" section), in the order shown.
TRAIN_METRICS = (
    ("optimizer steps", "steps"),
    ("epochs", "epochs"),
    ("training loss (mean over the run, nats/token)", "train_loss"),
    ("training tokens", "tokens"),
    ("training throughput (tokens/s)", "tokens_per_s"),
    ("training time (s)", "runtime_s"),
    ("trainable parameters (LoRA)", "trainable_params"),
    ("peak memory while training (GiB)", "peak_gib"),
)


def is_number(value) -> bool:
    """True for an int or a finite float (never a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and not (isinstance(value, float) and not math.isfinite(value)))


def difference(a, b):
    """``b - a`` when both are numbers (rounded to 10 significant digits, so 3.31795 - 3.35974 reads -0.04179 and
    not -0.041790000000000216), else None."""
    if not (is_number(a) and is_number(b)):
        return None
    d = b - a
    return d if isinstance(d, int) else float(f"{d:.10g}")


def signed(value) -> str:
    """A difference as text with its sign, 6 significant digits (``-0.04179``, ``+2.2``); ``0`` for none at all and
    ``""`` for None."""
    if value is None:
        return ""
    return "0" if value == 0 else f"{value:+.6g}"


@dataclass(frozen=True)
class MetricRow:
    """One metric of a table: ``label`` for people, ``key`` its path in metrics.json (``"finetuned.loss"``,
    ``"benchmarks.medqa.accuracy"``), the two values as recorded (None: not recorded), ``difference``
    (:func:`difference`: second minus first) and ``better``: ``"lower"``, ``"higher"`` or None (neither)."""

    label: str
    key: str
    first: object
    second: object
    difference: object
    better: str | None = None

    @property
    def verdict(self) -> str:
        """``"better"``, ``"worse"`` or ``""`` (no difference, or no better direction): the second against the
        first."""
        if not self.better or not self.difference:
            return ""
        return "better" if (self.difference > 0) == (self.better == "higher") else "worse"


def _get(data: dict, path: tuple[str, ...]):
    for part in path:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def benchmark_names(*sections: dict) -> list[str]:
    """The benchmarks recorded in any of ``sections`` (each a "baseline" or "finetuned" section), in first-seen
    order."""
    return list(dict.fromkeys(n for s in sections for n in (s.get("benchmarks") or {})))


def evaluation_rows(metrics: dict) -> list[MetricRow]:
    """Baseline (04) against fine-tuned (06): every held-out metric either recorded, then each benchmark's accuracy.

    Args:
        metrics: a run's metrics.json.

    Returns:
        :class:`MetricRow` s with ``first`` the baseline value, ``second`` the fine-tuned one; keys
        ``"<metric>"`` (held-out) and ``"benchmarks.<name>.accuracy"``. Empty when neither notebook recorded.
    """
    b, f = metrics.get("baseline") or {}, metrics.get("finetuned") or {}
    rows = []
    for label, key, better in HELDOUT_METRICS:
        bv, fv = b.get(key), f.get(key)
        if bv is not None or fv is not None:
            rows.append(MetricRow(label, key, bv, fv, difference(bv, fv), better))
    for name in benchmark_names(b, f):
        x, y = (b.get("benchmarks") or {}).get(name) or {}, (f.get("benchmarks") or {}).get(name) or {}
        ref = y or x
        label = f"{name}: accuracy ({ref.get('mode')}, {ref.get('items')} items; chance {ref.get('chance')})"
        rows.append(MetricRow(label, f"benchmarks.{name}.accuracy", x.get("accuracy"), y.get("accuracy"),
                              difference(x.get("accuracy"), y.get("accuracy")), "higher"))
    return rows


def training_rows(metrics: dict) -> list[tuple[str, object]]:
    """05's figures (``train`` section) as ``(label, value)``, those recorded, in :data:`TRAIN_METRICS` order."""
    t = metrics.get("train") or {}
    return [(label, t[key]) for label, key in TRAIN_METRICS if t.get(key) is not None]


def loss_before_after(metrics: dict) -> tuple[object, object]:
    """The held-out response loss before (04) and after (06) training, None where not recorded."""
    return (metrics.get("baseline") or {}).get("loss"), (metrics.get("finetuned") or {}).get("loss")


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """Nested settings as ``{"sft.learning_rate": 0.0002, ...}``; an empty section stays as ``{}`` under its own
    name, lists stay lists."""
    out: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def settings(run: RunDir) -> dict:
    """The run's config.yaml as it is written (read with PyYAML, not validated: a report reads the settings of any
    run, without importing the libraries that :func:`medtune.settings.config.load` checks them against); ``{}`` when
    it is missing or not YAML."""
    import yaml

    try:
        data = yaml.safe_load(run.config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def settings_rows(run: RunDir) -> list[tuple[str, str]]:
    """The run's settings (config.yaml) as ``(key, value)`` in file order, nested sections flattened
    (``sft.max_steps``); values written as JSON (``null``, ``true``, lists). Empty when config.yaml is unreadable.

    ``sft.optim`` also says what training ran when 05 recorded another optimizer (``paged_adamw_32bit (ran as
    adamw_torch: no CUDA)``: bitsandbytes' paged optimizers need CUDA, see :mod:`medtune.stages.train`)."""
    rows = [(k, show(v)) for k, v in flatten(settings(run)).items()]
    ran = (run.metrics().get("train") or {}).get("optim")
    return [(k, f"{v} (ran as {ran}: no CUDA)" if k == "sft.optim" and ran and ran != v else v) for k, v in rows]


def show(value) -> str:
    """A setting's value as text: strings as they are, the rest as JSON (``null``, ``true``, ``[0, 10]``)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of one of the run's JSONL files (:func:`medtune.stages.data.read_jsonl`); ``[]`` when it does not
    exist (a run that has not reached 04 or 06).

    Raises:
        medtune.stages.data.DataError: a line is not JSON (names the file and line); a ValueError.
    """
    from medtune.stages import data

    return data.read_jsonl(path) if path.is_file() else []


def answers_side_by_side(run: RunDir) -> list[dict]:
    """The held-out questions with the reference response, the un-tuned (04) and the fine-tuned (06) answers.

    Returns:
        One dict per question 04 or 06 answered, in 04's order: ``{"row", "question", "reference", "baseline",
        "finetuned", "baseline_cut", "finetuned_cut"}``; an answer that was not generated is None; ``*_cut`` is the
        answer's token count when it hit ``max_new_tokens`` without EOS (cut off), else None.
    """
    base, tuned = read_jsonl(run.baseline_path), read_jsonl(run.finetuned_path)
    refs = {r.get("row"): r.get("Response") for r in read_jsonl(run.heldout_path)}
    by_row = {a.get("row"): a for a in tuned}
    rows = [a.get("row") for a in base] + [a.get("row") for a in tuned if a.get("row") not in
                                             {b.get("row") for b in base}]
    first = {a.get("row"): a for a in base}
    out = []
    for row in rows:
        b, f = first.get(row), by_row.get(row)
        out.append({"row": row, "question": (b or f).get("question"), "reference": refs.get(row),
                    "baseline": b.get("answer") if b else None, "finetuned": f.get("answer") if f else None,
                    "baseline_cut": _cut(b), "finetuned_cut": _cut(f)})
    return out


def _cut(answer: dict | None) -> int | None:
    """The token count of an answer that ended at max_new_tokens without EOS, else None."""
    if answer and answer.get("stopped") is False:
        return answer.get("new_tokens")
    return None


def notebook_rows(run: RunDir, order: list[str] | None = None) -> list[dict]:
    """One row per notebook of the run: its state, time and memory, and its executed copy.

    Args:
        run: the run. order: the notebooks' names in run order (the manifest's); default: the executed copies and
            the notebooks that recorded resources, sorted.

    Returns:
        ``{"name", "state" ("completed" | "failed or stopped" | "not run"), "wall_s", "peak_gpu_gib",
        "peak_rss_gib", "ipynb" (the executed copy or None), "html" (its page or None)}`` per notebook; the
        resource figures are those the notebook's last cell recorded (None when it did not get there).
    """
    metrics = run.metrics()
    resources = metrics.get("resources") or {}
    completed = {Path(n).stem for n in (metrics.get("pipeline") or {}).get("completed", [])}
    executed = {p.stem for p in run.notebooks_dir.glob("[0-9][0-9]_*.ipynb")} if run.notebooks_dir.is_dir() else set()
    executed = {n for n in executed if "." not in n}  # not 00_authenticate.<time> (kept by a resume)
    names = list(order) if order else sorted(executed | set(resources))
    out = []
    for name in names:
        r = resources.get(name) or {}
        ipynb = run.notebooks_dir / f"{name}.ipynb"
        html = ipynb.with_suffix(".html")
        if name in completed or (not completed and r):
            state = "completed"
        elif ipynb.is_file():
            state = "failed or stopped"
        else:
            state = "not run"
        out.append({"name": name, "state": state, "wall_s": r.get("wall_s"), "peak_gpu_gib": r.get("peak_gpu_gib"),
                    "peak_rss_gib": r.get("peak_rss_gib"), "ipynb": ipynb if ipynb.is_file() else None,
                    "html": html if html.is_file() else None})
    return out
