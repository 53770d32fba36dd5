"""Notebooks 04 and 06 end to end: the smoke profile pointed at subsets of the real MedQA and PubMedQA files in
../shared, answers generated and the letters read from them, every figure checked in metrics.json, the
prediction files, the plot and the executed 06.

Between 04 and 06 the run gets a freshly initialised LoRA adapter (PEFT initialises B = 0, so the adapter adds
exactly zero) instead of 05's training: 06 must then measure exactly what 04 measured, figure for figure, which
checks that both notebooks score the same questions and items the same way. Training itself, and 06 after real
training, are covered by tests/pipeline/test_notebooks.py::test_run_all_smoke_profile.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from medtune import pipeline
from medtune.evaluation import multiple_choice as B

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(__file__).resolve().parents[3] / "shared"
LIMIT = 2
NEW_TOKENS = 12  # tokens per generated answer (the smoke profile's: 24)


def identity_adapter(run) -> None:
    """Save an untrained LoRA adapter (the profile's LoraConfig; B = 0) and the tokenizer where 05 would."""
    from peft import get_peft_model

    from medtune.settings import config
    from medtune.stages import modeling

    cfg = run.config()
    model, tokenizer = modeling.load_model(cfg)
    peft_model = get_peft_model(model, config.lora_config(cfg))
    assert all(float(p.detach().abs().max()) == 0.0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.save_pretrained(run.adapter_dir)
    tokenizer.save_pretrained(run.adapter_dir)


@pytest.mark.slow
def test_04_and_06_with_real_benchmark_subsets(tmp_path, monkeypatch):
    bench_dir = SHARED / "data" / "benchmarks"
    if not bench_dir.is_dir():
        pytest.fail(f"real benchmark files missing: {bench_dir} (see shared/data/README.md); never skipped.",
                    pytrace=False)
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    profile = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    profile.update(
        benchmarks={"medqa": str(bench_dir / "medqa_usmle_4op_test.jsonl"),
                    "pubmedqa": str(bench_dir / "pubmedqa_pqa_labeled_test.jsonl")},
        benchmark_limit=LIMIT, benchmark_mode="generate", eval_questions=2, benchmark_harness=True,
        max_new_tokens=NEW_TOKENS,  # on CPU each NF4 forward pass costs about the same, whatever the prompt length
    )
    params = tmp_path / "smoke_benchmarks.yaml"
    params.write_text(yaml.safe_dump(profile))
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    sources = {nb.name[:2]: nb for nb in pipeline.notebooks()}
    for key in ("00", "01", "02", "03", "04"):
        shutil.copy(sources[key], notebooks / sources[key].name)
    run = pipeline.run_all(params, notebooks_dir=notebooks)
    identity_adapter(run)
    shutil.copy(sources["06"], notebooks / sources["06"].name)
    run = pipeline.run_all(params, resume=run.path, notebooks_dir=notebooks)  # 00-04 done: runs 06 only

    m = json.loads(run.metrics_path.read_text())
    assert m["pipeline"]["completed"][-2:] == ["04_baseline.ipynb", "06_evaluate_finetuned.ipynb"]
    gold = {name: [i.answer for i in B.read_benchmark(spec, limit=LIMIT)]
            for name, spec in profile["benchmarks"].items()}
    assert gold["medqa"] == ["B", "D"] and gold["pubmedqa"] == ["A", "C"]
    items = {name: B.read_benchmark(spec, limit=LIMIT) for name, spec in profile["benchmarks"].items()}
    for stage in ("baseline", "finetuned"):
        s = m[stage]
        # held-out generation scores: eval_questions answers, shares in [0, 1]
        assert s["answers"] == 2 and 0 < s["mean_new_tokens"] <= NEW_TOKENS
        assert 0.0 <= s["rouge_l"] <= 1.0 and 0.0 <= s["template_share"] <= 1.0 and 0.0 <= s["stopped_with_eos"] <= 1.0
        assert s["mean_answer_chars"] >= 0 and s["examples"] == 4  # the loss still covers every held-out row
        for name in ("medqa", "pubmedqa"):
            r = s["benchmarks"][name]
            assert r["mode"] == "generate" and r["items"] == LIMIT
            assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] == round(r["correct"] / LIMIT, 4)
            assert 0 <= r["unparsed"] <= LIMIT and r["unparsed_share"] == round(r["unparsed"] / LIMIT, 4)
            assert r["correct"] <= LIMIT - r["unparsed"]  # unparseable answers count as wrong
            assert sum(r["predicted_counts"].values()) == LIMIT
            assert r["predicted_spread"] == B.spread(r) and r["predicted_spread"].startswith("A ")
            assert sum(r["answer_counts"].values()) == LIMIT
            assert r["chance"] == (0.25 if name == "medqa" else 0.3333)
            # lm-eval on the same model: its own task and prompt (generate mode: no same-prompt log-likelihoods)
            h = r["harness"]
            assert h["lm_eval"] == "0.4.13" and h["same_prompt"] is None and "benchmark_mode: loglik" in h["note"]
            assert h["own_prompt"]["task"] == ("medqa_4options" if name == "medqa" else "pubmedqa")
            assert h["own_prompt"]["items"] == LIMIT and h["own_prompt"]["accuracy"] in (0.0, 0.5, 1.0)
            preds = B.load_predictions(B.predictions_path(run, stage, name))
            assert [p["answer"] for p in preds] == gold[name]
            # the recorded letter is the rule applied to the saved output
            for p, item in zip(preds, items[name], strict=True):
                assert p["predicted"] == B.extract_choice(p["output"], item.options)
                assert p["parsed"] == (p["predicted"] is not None) and 1 <= p["new_tokens"] <= NEW_TOKENS
            assert sum(not p["parsed"] for p in preds) == r["unparsed"]
            assert sum(p["correct"] for p in preds) == r["correct"]
    assert m["finetuned"]["paper_anchor"] == json.loads(json.dumps(B.PAPER_ANCHOR))
    # the adapter adds zero: 06 measured exactly what 04 did
    same = {k: v for k, v in m["finetuned"].items() if k != "paper_anchor"}
    assert same == m["baseline"]
    for name in ("medqa", "pubmedqa"):
        assert (B.load_predictions(B.predictions_path(run, "finetuned", name))
                == B.load_predictions(B.predictions_path(run, "baseline", name)))

    assert (run.path / "evaluation.png").stat().st_size > 10_000
    nb06 = (run.notebooks_dir / "06_evaluate_finetuned.ipynb").read_text()
    for text in ("| held-out metric | baseline | fine-tuned | difference |", "medqa: accuracy (generate, 2 items",
                 "pubmedqa: unparseable answers (count, counted wrong)", "medqa: predicted letters",
                 "ROUGE-L F1, answer after",
                 "Context, not a target", "Llama-3.1-8B-Instruct before SFT (paper)", "image/png"):
        assert text in nb06, text
    nb04 = (run.notebooks_dir / "04_baseline.ipynb").read_text()
    assert "| medqa | generate | en | 2 |" in nb04 and "| pubmedqa | generate | en | 2 |" in nb04
    assert "| medqa_4options |" in nb04 and "| medqa_4options |" in nb06
    assert "Not the same measurement" not in nb06
