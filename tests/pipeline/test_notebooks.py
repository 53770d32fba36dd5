"""The notebooks as users get them: clean sources, and all eight executed headless on the smoke profile."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from medtune import pipeline

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_eight_notebooks_in_walkthrough_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names == [
        "00_authenticate", "01_load_quantized_model", "02_check_gpu", "03_format_prompts",
        "04_baseline", "05_train_lora", "06_evaluate_finetuned", "07_push",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_source_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "outputs committed"
    for c in code:
        assert not re.search(r"^\s*(def|class)\s", c.source, re.M), f"definition in a notebook cell:\n{c.source}"
        assert "sys.path" not in c.source
    # papermill needs a kernelspec; JupyterLab starts the project's kernel by this name (make kernel / make lab)
    assert nb.metadata["kernelspec"] == {"name": "medtune", "display_name": "medtune", "language": "python"}
    # parameters: UPPER_CASE literals, annotated, one comment each
    for line in tagged[0].source.splitlines():
        assert re.match(r"^[A-Z_]+: [\w |\[\]]+ = .+  # .+", line), \
            f"parameter line not 'NAME: type = literal  # comment': {line}"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


@pytest.mark.slow
def test_run_all_smoke_profile(headless_smoke_run):
    """All eight notebooks headless into one run (tests/pipeline/conftest.py); the metrics they record are checked,
    and no token leaks."""
    run = headless_smoke_run.run
    CANARY, MS_CANARY = headless_smoke_run.canaries

    executed = sorted(p.name for p in run.notebooks_dir.glob("*.ipynb"))
    assert executed == [p.name for p in NOTEBOOKS]
    m = json.loads(run.metrics_path.read_text())
    assert m["pipeline"]["completed"] == [p.name for p in NOTEBOOKS]
    assert m["auth"]["hub_needed"] is False
    # 01: SmolLM2-135M has 30 layers x 7 projections quantized; lm_head is tied to the embedding and stays bf16
    assert m["load"]["quantized_linear"] == 210
    assert 0.05 < m["load"]["footprint_gib"] < 0.3
    assert m["gpu"]["devices"][0]["device"] in ("cpu", "cuda:0")
    # 03: 16 rows, rows 0 and 10 held out plus 2 more
    assert m["data"]["rows"] == 16 and m["data"]["train"] == 12 and m["data"]["heldout"] == 4
    assert {0, 10} <= set(m["data"]["heldout_rows"])
    # 04/06: same examples, same number of scored tokens; training lowers the held-out loss
    b, f = m["baseline"], m["finetuned"]
    assert b["examples"] == f["examples"] == 4 and b["tokens"] == f["tokens"] > 100
    assert 0.5 < b["loss"] < 6 and abs(b["perplexity"] - 2.718281828 ** b["loss"]) / b["perplexity"] < 1e-3
    assert f["loss"] < b["loss"], (b["loss"], f["loss"])
    assert b["answers"] == f["answers"] == 4 and 0 < b["mean_new_tokens"] <= 24
    # 05: 4 optimizer steps, LoRA r=64 on 7 projections x 30 layers of SmolLM2-135M
    t = m["train"]
    assert t["steps"] == 4 and t["trainable_params"] == 19_537_920 and t["tokens_per_s"] > 0
    assert (run.adapter_dir / "adapter_config.json").is_file() and run.loss_curve_path.stat().st_size > 5_000
    assert "More Information Needed" not in (run.adapter_dir / "README.md").read_text()  # not PEFT's template card
    nb05 = nbformat.read(run.notebooks_dir / "05_train_lora.ipynb", as_version=4)
    assert any("image/png" in o.get("data", {}) for c in nb05.cells for o in c.get("outputs", []))  # the curve shows
    # 07: dry run wrote exactly the folder it would upload
    assert m["push"]["dry_run"] is True
    pushed = {p.name for p in run.push_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= pushed
    # 06 shows baseline and fine-tuned answers side by side
    nb06 = (run.notebooks_dir / "06_evaluate_finetuned.ipynb").read_text()
    assert "baseline (un-tuned)" in nb06 and "fine-tuned (LoRA)" in nb06
    # the tokens were in the environment of every kernel, and are in no file of the run (its report and manifest
    # included), nor in the index of runs beside it, nor in the pipeline's output
    assert (run.path.parent / "index.html").is_file() and run.report_path.is_file() and run.manifest_path.is_file()
    for path in run.path.parent.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert CANARY.encode() not in data and MS_CANARY.encode() not in data, f"token leaked into {path}"
    assert CANARY not in headless_smoke_run.printed and MS_CANARY not in headless_smoke_run.printed
    assert m["preflight"]["ok"] is True and m["data"]["bad_rows"]["skipped"] == 0  # 00/01 preflight, 03 row check
    # every notebook recorded its wall time and peaks; CPU run: no GPU figure; 07 shows the table of all eight
    res = m["resources"]
    assert sorted(res) == [p.stem for p in NOTEBOOKS]
    for name, r in res.items():
        assert 0 < r["wall_s"] < 3600 and r["peak_gpu_gib"] is None, (name, r)
        assert 0.05 < r["peak_rss_gib"] < 16, (name, r)
    assert res["05_train_lora"]["peak_rss_gib"] > res["02_check_gpu"]["peak_rss_gib"]  # a model was loaded in 05
    nb07 = (run.notebooks_dir / "07_push.ipynb").read_text()
    for name in res:
        r = res[name]
        assert f"| {name} | {r['wall_s'] / 60:.2f} | - | {r['peak_rss_gib']:.2f} |" in nb07, name
    assert "| notebook | wall time (min) | peak GPU memory (GiB) | peak CPU RSS (GiB) |" in nb07


@pytest.mark.slow
def test_failing_notebook_stops_the_run_and_keeps_the_error(tmp_path, monkeypatch):
    """A bad dataset path fails in 00 (preflight reads local datasets before any model loads): the run stops, exits
    non-zero, and 00's executed copy shows the error; the manifest and the report (written anyway) say where."""
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    profile = tmp_path / "bad.yaml"
    text = (ROOT / "params" / "smoke.yaml").read_text()
    profile.write_text(re.sub(r"(?m)^dataset: .*$", f"dataset: {tmp_path / 'missing.jsonl'}", text))
    code = pipeline.main(["--params", str(profile)])
    assert code == 1
    (run_dir,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]  # beside it: the index of runs
    executed = sorted(p.name for p in (run_dir / "notebooks").glob("*.ipynb"))
    assert executed == ["00_authenticate.ipynb"]
    assert "dataset file not found" in (run_dir / "notebooks" / "00_authenticate.ipynb").read_text()
    man = json.loads((run_dir / "manifest.json").read_text())
    assert (man["status"], man["notebook"], man["error"]) == ("failed", "00_authenticate", "PapermillExecutionError")
    assert man["dataset"]["train_rows"]["sha256"] is None  # 03 never ran
    page = (run_dir / "index.html").read_text()
    assert '<span class="status failed">failed in 00_authenticate</span>' in page
    assert "dataset file not found" in (run_dir / "notebooks" / "00_authenticate.html").read_text()


@pytest.mark.parametrize("name", ["04_baseline", "06_evaluate_finetuned"])
def test_eval_parameters_are_validated_before_the_model_loads(name, outputs):
    """04/06 hand MAX_NEW_TOKENS to runs.session with the other parameters, in the cell before the model loads, so
    -5 is a ConfigError there, not a failure after a (for Scout: minutes-long) load."""
    from medtune.settings import config as C
    from medtune.settings import runs

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    (first,) = [c.source for c in nb.cells if "runs.session(" in c.source]
    assert "max_new_tokens=MAX_NEW_TOKENS or None" in first
    assert first.index("runs.session(") < first.index("modeling.load_model(")
    with pytest.raises(C.ConfigError, match="'max_new_tokens' must be at least 1, got -5"):
        runs.session(str(ROOT / "params" / "smoke.yaml"), "", new_run=True, max_new_tokens=-5)


@pytest.mark.slow
def test_smoke_run_manifest_and_progress_bars(headless_smoke_run):
    """The manifest of the smoke run: finished, the rows 03 wrote fingerprinted, the profile hashed; and every
    executed notebook shows each progress bar once, ending with its final line."""
    import hashlib

    run = headless_smoke_run.run
    man = json.loads(run.manifest_path.read_text())
    assert (man["status"], man["notebook"], man["error"]) == ("finished", None, None)
    assert man["notebooks"] == [p.stem for p in NOTEBOOKS] and man["started_at"] <= man["ended_at"]
    rows = run.train_data_path.read_bytes()
    assert man["dataset"]["train_rows"] == {"file": "data/train.jsonl", "rows": 12,
                                            "sha256": hashlib.sha256(rows).hexdigest()}
    smoke = (ROOT / "params" / "smoke.yaml").read_bytes()
    assert man["profile"] == {"path": "params/smoke.yaml", "sha256": hashlib.sha256(smoke).hexdigest()}
    assert man["seeds"] == {"seed": 42, "sft.seed": 42, "sft.data_seed": None}
    assert man["hardware"]["device"] in ("cpu", "cuda") and man["packages"]["papermill"] == "2.7.0"
    # 04 answers (4 questions in one batch: the bar counts answers), scores the held-out loss and the benchmark (one
    # batch each): one bar each, with its final line
    nb04 = nbformat.read(run.notebooks_dir / "04_baseline.ipynb", as_version=4)
    text = "".join(o.text for c in nb04.cells for o in c.get("outputs", []) if o.output_type == "stream")
    for desc, done, unit in (("generating", "4/4", "answer"), ("held-out loss", "1/1", "it"),
                             ("option log-likelihood", "1/1", "it")):
        lines = [line for line in text.splitlines() if line.startswith(f"{desc}:")]
        assert len(lines) == 1, (desc, lines)
        pattern = rf"{desc}: 100%\|#+\| {done} \[\d\d:\d\d<00:00, +[\d.]+(s/{unit}|{unit}/s)"
        assert re.match(pattern, lines[0]), lines[0]
    for path in run.notebooks_dir.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            streams = [o for o in cell.get("outputs", []) if o.output_type == "stream"]
            assert not any("\r" in o.text for o in streams), path.name
            names = [o.name for o in streams]
            assert all(a != b for a, b in zip(names, names[1:], strict=False)), (path.name, names)  # merged
