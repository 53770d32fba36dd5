"""medtune.evaluation.harness: lm-evaluation-harness (lm-eval, installed by `make test` from the dev extra; no skip)
run offline on the same in-memory model as medtune's scoring, on the real MedQA and PubMedQA items of ../shared.

- Same items, same prompt: lm-eval's log-likelihoods equal medtune's within AGREEMENT_NATS (a tiny random Llama with
  the real Llama 4 tokenizer, plain and under a PEFT LoRA adapter as 06 has it; and, marked slow, the default
  profile's real SmolLM2 in NF4).
- lm-eval's own MedQA and PubMedQA tasks on local files: their predictions equal a hand computation of the same
  prompt with medtune's own log-likelihood code, so the items reached the task in the layout it expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medtune.evaluation import harness as H
from medtune.evaluation import multiple_choice as B
from medtune.settings import config as C
from medtune.settings.runs import RunDir
from tests.helpers import tiny_scoring_llama

PARAMS = Path(__file__).resolve().parents[2] / "params"


@pytest.fixture(scope="module")
def bench(shared) -> dict:
    folder = shared / "data" / "benchmarks"
    return {"medqa": folder / "medqa_usmle_4op_test.jsonl", "pubmedqa": folder / "pubmedqa_pqa_labeled_test.jsonl"}


@pytest.fixture(scope="module")
def tok(llama4_tokenizer):
    return llama4_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    return tiny_scoring_llama(tok, max_positions=4096)

def test_lm_eval_is_installed_at_the_pinned_version():
    import tomllib

    pyproject = tomllib.loads((PARAMS.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert "lm-eval==0.4.13" in pyproject["project"]["optional-dependencies"]["dev"]
    assert H.lm_eval_version() == "0.4.13"
    import yaml

    for task in H.TASKS.values():  # the task files medtune includes are lm-eval's own, under these names
        text = H.task_file(task).read_text(encoding="utf-8")
        assert yaml.safe_load(text.replace("!function", ""))["task"] == task


def test_same_prompt_agrees_with_medtune_on_real_items(model, tok, bench, tmp_path):
    """8 real MedQA and 4 real PubMedQA items (abstracts of ~300-700 tokens), 4 per batch in both."""
    items = B.read_benchmark(str(bench["medqa"]), limit=8) + B.read_benchmark(str(bench["pubmedqa"]), limit=4)
    ours = B.predict_loglik(model, tok, items, batch_size=4)
    theirs = H.same_prompt(H._harness_model(model, tok, 4), items, "en", tmp_path / "same.jsonl")
    check = H.compare(ours, theirs)
    print(check)
    assert check["within_margin"] and check["agree"] == 1.0 and check["items"] == 12
    assert check["max_abs_diff_nats"] <= 1e-4  # medtune rounds to 4 places: <= 5e-5 plus float32 summation
    assert check["accuracy"] == round(sum(p["correct"] for p in ours) / 12, 4)
    rows = [json.loads(line) for line in (tmp_path / "same.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == B.mc_prompt(items[0]) + B.ANSWER_PREFIX["en"]
    assert rows[0]["choices"] == [" A", " B", " C", " D"] and rows[8]["choices"] == [" A", " B", " C"]
    assert [r["gold"] for r in rows[:3]] == [1, 3, 1]  # the real file's answers b, d, b


def test_same_prompt_under_a_lora_adapter_as_in_06(model, tok, bench, tmp_path):
    """06 hands lm-eval the PEFT model (adapter unmerged). Random B matrices, so the adapter changes the scores."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False)).eval()
    items = B.read_benchmark(str(bench["medqa"]), limit=4)
    ours = B.predict_loglik(peft_model, tok, items, batch_size=2)
    assert ours[0]["scores"] != B.predict_loglik(model, tok, items[:1])[0]["scores"]
    check = H.compare(ours, H.same_prompt(H._harness_model(peft_model, tok, 2), items, "en", tmp_path / "s.jsonl"))
    assert check["within_margin"] and check["agree"] == 1.0


def hand_own_prompt(model, tok, items, task: str) -> list[str]:
    """lm-eval's prompts for its medqa_4options / pubmedqa tasks written out by hand (lm_eval/tasks/medqa and
    pubmedqa, 0.4.13), choices after a space, scored with medtune's continuation_logprobs; argmax -> letter."""
    out = []
    for i in items:
        listed = "".join(f"{B.LETTERS[k]}. {o}\n" for k, o in enumerate(i.options))
        if task == "medqa_4options":
            prompt = f"Question: {i.question}\n{listed}Answer:"
            conts = [" A", " B", " C", " D"]
        elif task == "medmcqa":
            prompt = f"Question: {i.question}\nChoices:\n{listed}Answer:"
            conts = [" A", " B", " C", " D"]
        else:
            prompt = f"Abstract: {i.context}\nQuestion: {i.question}\nAnswer:"
            conts = [" yes", " no", " maybe"]
        scores = B.continuation_logprobs(model, tok, [(prompt, c) for c in conts], batch_size=4)
        out.append(B.LETTERS[max(range(len(scores)), key=lambda k: (scores[k], -k))])
    return out


# No MedMCQA file is in ../shared: its task runs on real MedQA items (4 options too), to check its layout and prompt.
@pytest.mark.parametrize(("name", "task", "limit"), [("medqa", "medqa_4options", 8), ("pubmedqa", "pubmedqa", 4),
                                                     ("medqa", "medmcqa", 4)])
def test_own_prompt_tasks_read_the_real_items_from_local_files(model, tok, bench, tmp_path, name, task, limit):
    items = B.read_benchmark(str(bench[name]), limit=limit)
    own = H.own_prompt(H._harness_model(model, tok, 4), items, task, tmp_path)
    hand = hand_own_prompt(model, tok, items, task)
    assert own["task"] == task and own["items"] == limit and own["predicted"] == hand
    assert own["accuracy"] == round(sum(h == i.answer for h, i in zip(hand, items, strict=True)) / limit, 4)
    assert (own["accuracy_norm"] is None) == (task == "pubmedqa")  # lm-eval's pubmedqa task has acc only
    doc = json.loads((tmp_path / f"{task}.jsonl").read_text().splitlines()[0])
    if task == "medqa_4options":
        assert doc == {"sent1": items[0].question, **{f"ending{k}": o for k, o in enumerate(items[0].options)},
                       "label": 1}
    elif task == "medmcqa":
        assert doc == {"question": items[0].question, **dict(zip(("opa", "opb", "opc", "opd"), items[0].options,
                                                                 strict=True)), "cop": 1}
    else:
        assert doc["QUESTION"] == items[0].question and doc["final_decision"] == items[0].options[
            B.LETTERS.index(items[0].answer)]
        assert "\n".join(doc["CONTEXTS"]) == items[0].context


def test_task_document_layouts_and_misfits():
    four = B.MCItem(id="1", question="q?", options=("a", "b", "c", "d"), answer="C")
    assert H.task_document(four, "medmcqa") == {"question": "q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
                                                "cop": 2}
    ynm = B.MCItem(id="2", question="q?", options=("yes", "no", "maybe"), answer="B", context="p1\np2")
    assert H.task_document(ynm, "pubmedqa") == {"QUESTION": "q?", "CONTEXTS": ["p1", "p2"], "final_decision": "no"}
    with pytest.raises(H.HarnessError, match="item 2 \\(3 options\\) does not fit lm-eval's medqa_4options task"):
        H.task_document(ynm, "medqa_4options")
    with pytest.raises(H.HarnessError, match="unknown lm-eval task 'mmlu'"):
        H.task_document(four, "mmlu")
    assert [H.task_for(n) for n in ("medqa", "pubmedqa", "medmcqa", "medqa_style_illustrative")] == [
        "medqa_4options", "pubmedqa", "medmcqa", None]


def test_cross_check_in_04_and_its_table(model, tok, bench, tmp_path):
    """04's two cells on a run: measure, then cross_check; a benchmark without an lm-eval task gets the same-prompt
    check only, with the reason; off (the default) it changes nothing."""
    from medtune.stages import preflight

    cfg = C.load(PARAMS / "smoke.yaml").replace(
        benchmarks={"medqa": str(bench["medqa"]), "pubmedqa": str(bench["pubmedqa"]),
                    "medqa_style_illustrative": "package:medtune/assets/mc_medqa_style_illustrative.jsonl"},
        benchmark_limit=3, eval_batch_size=2)
    run = RunDir.create(cfg, root=tmp_path)
    results = B.measure(cfg, run, model, tok, "baseline")
    assert H.cross_check(cfg, run, model, tok, "baseline", results) is results  # benchmark_harness: false
    assert H.show(results).startswith("_lm-evaluation-harness cross-check off")
    on = cfg.replace(benchmark_harness=True)
    checked = H.cross_check(on, run, model, tok, "baseline", results)
    for name in ("medqa", "pubmedqa", "medqa_style_illustrative"):
        h = checked[name]["harness"]
        assert h["lm_eval"] == "0.4.13" and h["same_prompt"]["within_margin"] and h["same_prompt"]["items"] == 3
        assert h["same_prompt"]["accuracy"] == checked[name]["accuracy"]
    assert checked["medqa"]["harness"]["own_prompt"]["task"] == "medqa_4options"
    assert checked["pubmedqa"]["harness"]["own_prompt"]["items"] == 3
    assert checked["medqa_style_illustrative"]["harness"]["own_prompt"] is None
    assert "no lm-eval task for 'medqa_style_illustrative'" in checked["medqa_style_illustrative"]["harness"]["note"]
    assert (run.path / "benchmarks" / "harness" / "baseline-medqa" / "medqa_4options.jsonl").is_file()
    table = H.show(checked)
    assert table.splitlines()[0].startswith("| benchmark | medtune accuracy | lm-eval, same prompt: accuracy |")
    assert "| medqa_4options |" in table and "| pubmedqa |" in table
    # 00 says what will run, and stops when lm-eval is missing
    assert preflight.check_harness(on).detail == (
        "lm-eval 0.4.13; medqa -> medqa_4options, pubmedqa -> pubmedqa, medqa_style_illustrative -> same-prompt check "
        "only.")
    assert preflight.check_harness(cfg).status == "ok"


def test_missing_lm_eval_stops_00(monkeypatch):
    from medtune.stages import preflight

    monkeypatch.setattr(H, "lm_eval_version", lambda: None)
    check = preflight.check_harness(C.load(PARAMS / "smoke.yaml").replace(benchmark_harness=True))
    assert check.status == "error" and "make env EXTRAS=harness" in check.fix and "lm-eval 0.4.13" in check.fix


@pytest.mark.slow
def test_same_prompt_agrees_on_the_default_model_in_nf4(bench, tmp_path):
    """The default profile's real model (SmolLM2-135M-Instruct, NF4 by bitsandbytes on the CPU, float32 compute),
    loaded as 04 loads it: 8 real MedQA items, batches of 4."""
    from medtune.stages import modeling

    cfg = C.load(PARAMS / "smoke.yaml")
    real, tokenizer = modeling.load_model(cfg)
    items = B.read_benchmark(str(bench["medqa"]), limit=8)
    ours = B.predict_loglik(real, tokenizer, items, batch_size=4)
    check = H.compare(ours, H.same_prompt(H._harness_model(real, tokenizer, 4), items, "en", tmp_path / "s.jsonl"))
    print(check)
    assert check["within_margin"] and check["agree"] == 1.0
