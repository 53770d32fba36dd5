"""medtune.evaluation.multiple_choice: readers on the real benchmark files in ../shared and on hand-made rows in the Hub
layouts, the letter-extraction rule on tricky outputs, log-likelihood scoring on a tiny random Llama against a hand
computation, summaries, the anchor table, and the profile keys."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from medtune.evaluation import multiple_choice as B
from medtune.settings import config as C
from medtune.settings.runs import RunDir
from tests.helpers import tiny_scoring_llama

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(__file__).resolve().parents[3] / "shared"
PARAMS = ROOT / "params"


@pytest.fixture(scope="module")
def bench_dir() -> Path:
    folder = SHARED / "data" / "benchmarks"
    if not folder.is_dir():
        pytest.fail(f"real benchmark files missing: {folder} (see shared/data/README.md). These tests never skip.",
                    pytrace=False)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Readers: the real files
# ---------------------------------------------------------------------------------------------------------------

def test_real_medqa_file(bench_dir):
    items = B.read_benchmark(str(bench_dir / "medqa_usmle_4op_test.jsonl"))
    assert len(items) == 1273
    assert all(len(i.options) == 4 and i.answer in "ABCD" and i.context is None for i in items)
    assert Counter(i.answer for i in items) == {"A": 353, "B": 309, "C": 346, "D": 265}
    first = json.loads((bench_dir / "medqa_usmle_4op_test.jsonl").open().readline())
    assert items[0].id == str(first["problem_id"]) and items[0].question == first["problem_text"].strip()
    assert items[0].options == tuple(first["choices"]) and items[0].answer == first["answer"][0].upper() == "B"
    first_three = B.read_benchmark(str(bench_dir / "medqa_usmle_4op_test.jsonl"), limit=3)
    assert [i.answer for i in first_three] == ["B", "D", "B"]


def test_real_pubmedqa_file(bench_dir):
    items = B.read_benchmark(str(bench_dir / "pubmedqa_pqa_labeled_test.jsonl"))
    assert len(items) == 500
    assert all(i.options == ("yes", "no", "maybe") for i in items)
    assert all(i.context and len(i.context) > 200 for i in items)
    assert Counter(i.answer for i in items) == {"A": 276, "B": 169, "C": 55}  # yes / no / maybe


def test_illustrative_samples_of_the_default_profile():
    cfg = C.load(PARAMS / "default.yaml")
    specs = [B.spec_of(v) for v in cfg.benchmarks.values()]
    medqa, pubmed = (B.read_benchmark(s["source"]) for s in specs)
    assert len(medqa) == len(pubmed) == 8 and cfg.benchmark_limit == 8
    assert Counter(i.answer for i in medqa) == {"A": 2, "B": 2, "C": 2, "D": 2}
    assert Counter(i.answer for i in pubmed) == {"A": 3, "B": 3, "C": 2}
    assert all(i.context.startswith("An illustrative, fictional study") for i in pubmed)


# ---------------------------------------------------------------------------------------------------------------
# Readers: Hub layouts (hand-made rows)
# ---------------------------------------------------------------------------------------------------------------

OPTS = ("Radial nerve", "Ulnar nerve", "Median nerve", "Axillary nerve")
EXPECTED_MEDQA = B.MCItem(id="7", question="Which nerve is injured in wrist drop?", options=OPTS, answer="A")
CTX = ["Background paragraph.", "Results paragraph."]
EXPECTED_PUBMED = B.MCItem(id="123", question="Does X help?", options=("yes", "no", "maybe"), answer="C",
                           context="Background paragraph.\nResults paragraph.")

MEDQA_ROWS = {
    "shared file": {"problem_id": 7, "problem_text": "Which nerve is injured in wrist drop?", "choices": list(OPTS),
                    "answer": ["a"], "points": 1},
    "GBaker/MedQA-USMLE-4-options": {"id": 7, "question": "Which nerve is injured in wrist drop?",
                                     "options": {"A": OPTS[0], "B": OPTS[1], "C": OPTS[2], "D": OPTS[3]},
                                     "answer_idx": "A", "answer": OPTS[0], "meta_info": "step1"},
    "bigbio/med_qa source": {"id": 7, "question": "Which nerve is injured in wrist drop? ",
                             "options": [{"key": k, "value": v} for k, v in zip("DCBA", reversed(OPTS), strict=True)],
                             "answer_idx": "A", "answer": OPTS[0]},
    "bigbio QA schema": {"id": 7, "question_id": "q7", "question": "Which nerve is injured in wrist drop?",
                         "type": "multiple_choice", "choices": list(OPTS), "context": "", "answer": [OPTS[0]]},
}
PUBMED_ROWS = {
    "shared file": {"problem_id": 123, "problem_text": "Does X help?", "context": "\n".join(CTX),
                    "choices": ["yes", "no", "maybe"], "answer": ["c"]},
    "qiaojin/PubMedQA pqa_labeled": {"pubid": 123, "question": "Does X help?",
                                     "context": {"contexts": CTX, "labels": ["BACKGROUND", "RESULTS"], "meshes": []},
                                     "long_answer": "Perhaps.", "final_decision": "maybe"},
    "bigbio/pubmed_qa source": {"QUESTION": "Does X help?", "CONTEXTS": CTX, "PUBMED_ID": 123,
                                "final_decision": "maybe", "LONG_ANSWER": "Perhaps."},
    "bigbio QA schema": {"id": 123, "question": "Does X help?", "context": "\n".join(CTX),
                         "choices": ["yes", "no", "maybe"], "answer": ["maybe"], "type": "yesno"},
}


@pytest.mark.parametrize("layout", MEDQA_ROWS)
def test_medqa_layouts_normalize_to_one_item(layout):
    assert B.normalize_row(MEDQA_ROWS[layout]) == EXPECTED_MEDQA


@pytest.mark.parametrize("layout", PUBMED_ROWS)
def test_pubmedqa_layouts_normalize_to_one_item(layout):
    assert B.normalize_row(PUBMED_ROWS[layout]) == EXPECTED_PUBMED


def test_dataset_folder_goes_through_datasets_load_dataset(tmp_path):
    """A source that is not a JSONL file is read by datasets.load_dataset (as a Hub id would be), split "test"."""
    folder = tmp_path / "medqa_hub_copy"
    folder.mkdir()
    rows = [MEDQA_ROWS["GBaker/MedQA-USMLE-4-options"], {**MEDQA_ROWS["GBaker/MedQA-USMLE-4-options"], "id": 8,
                                                          "answer_idx": "C", "answer": OPTS[2]}]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = B.read_benchmark(str(folder))
    assert items[0] == EXPECTED_MEDQA and items[1].answer == "C" and items[1].id == "8"
    assert B.read_benchmark(str(folder), split="test", limit=1) == [EXPECTED_MEDQA]


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(B.BenchmarkError, match="unknown layout.*fields: prompt, target"):
        B.normalize_row({"prompt": "x", "target": "y"}, 4, "mine.jsonl")
    with pytest.raises(B.BenchmarkError, match="row 2: answer 'e' is not one of the letters ABCD"):
        B.normalize_row({**MEDQA_ROWS["shared file"], "answer": ["e"]}, 1, "f")
    with pytest.raises(B.BenchmarkError, match="answer 'perhaps' is not the text of one of its options"):
        B.normalize_row({**PUBMED_ROWS["qiaojin/PubMedQA pqa_labeled"], "final_decision": "perhaps"})
    with pytest.raises(B.BenchmarkError, match="benchmark file not found"):
        B.read_benchmark(str(tmp_path / "missing.jsonl"))
    with pytest.raises(B.BenchmarkError, match="give a source"):
        B.spec_of({"path": "x.jsonl"})


def bench_file(tmp_path, bad: dict | str, name: str = "bench.jsonl") -> Path:
    """A JSONL file: a good row on line 1, a blank line 2, then ``bad`` (a row, or raw text) on line 3."""
    path = tmp_path / name
    third = bad if isinstance(bad, str) else json.dumps(bad)
    path.write_text(json.dumps(MEDQA_ROWS["shared file"]) + "\n\n" + third + "\n")
    return path


def reader_error(source, **kw) -> str:
    with pytest.raises(B.BenchmarkError) as err:
        B.read_benchmark(str(source), **kw)
    return str(err.value)


FIX_OPTIONS = "Give 'choices' as a list of option texts [\"text A\", \"text B\", ...] or a mapping {\"A\": text, ...}."


def test_null_choices_names_file_and_line(tmp_path):
    path = bench_file(tmp_path, {**MEDQA_ROWS["shared file"], "choices": None})
    assert reader_error(path) == f"{path} line 3: 'choices' is null, not a list of options. {FIX_OPTIONS}"


def test_string_choices_is_an_error_not_four_letters(tmp_path):
    path = bench_file(tmp_path, {**MEDQA_ROWS["shared file"], "choices": "ABCD"})
    assert reader_error(path) == f"{path} line 3: 'choices' is str ('ABCD'), not a list of options. {FIX_OPTIONS}"
    # a mapping letter -> text is accepted for choices too
    as_mapping = dict(zip("ABCD", OPTS, strict=True))
    assert B.normalize_row({**MEDQA_ROWS["shared file"], "choices": as_mapping}) == EXPECTED_MEDQA


def test_empty_benchmark_file_is_an_error(tmp_path):
    for text in ("", "\n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        assert reader_error(path) == (
            f"{path}: no items (the file has no rows). Give a benchmark file with at least one item (one JSON object "
            "a line), or remove it from the profile's 'benchmarks'.")


def test_null_option_in_a_mapping_is_named(tmp_path):
    row = {"id": 1, "question": "Q?", "options": {"A": "x", "B": None}, "answer_idx": "B"}
    path = bench_file(tmp_path, row)
    assert reader_error(path) == (f"{path} line 3: option B of 'options' has no text (null). Give option B its text; "
                                  "every option needs one.")
    middle = {**MEDQA_ROWS["GBaker/MedQA-USMLE-4-options"], "options": {"A": "x", "B": None, "C": "z", "D": "w"}}
    with pytest.raises(B.BenchmarkError, match=r"^f line 3: option B of 'options' has no text \(null\)"):
        B.normalize_row(middle, 0, "f", line=3)
    # trailing nulls, as datasets fills in for a 4-option row among 5-option ones, are absent options
    hub_row = {**MEDQA_ROWS["GBaker/MedQA-USMLE-4-options"],
               "options": {**MEDQA_ROWS["GBaker/MedQA-USMLE-4-options"]["options"], "E": None}}
    assert B.normalize_row(hub_row) == EXPECTED_MEDQA
    with pytest.raises(B.BenchmarkError, match=r"^f row 1: option E of 'options' has no text \(null\)"):
        B.normalize_row({**hub_row, "answer_idx": "E"}, 0, "f")  # ... unless the answer is that option


def test_non_text_context_names_file_and_line(tmp_path):
    path = bench_file(tmp_path, {**PUBMED_ROWS["shared file"], "context": 5})
    assert reader_error(path) == (
        f"{path} line 3: 'context' is int (5), not text. Give the context as text, a list of paragraph texts or "
        "{\"contexts\": [paragraphs]}, or leave the field out.")
    with pytest.raises(B.BenchmarkError, match=r"^f row 1: 'CONTEXTS' is list \(\[1, 2\]\), not text"):
        B.normalize_row({**PUBMED_ROWS["bigbio/pubmed_qa source"], "CONTEXTS": [1, 2]}, 0, "f")


def test_unreadable_line_names_file_and_line(tmp_path):
    path = bench_file(tmp_path, "{not json")
    assert reader_error(path).startswith(f"{path} line 3: not valid JSON (")


@pytest.fixture
def no_hub(monkeypatch):
    """datasets.load_dataset replaced: calls are recorded, and each raises what ``no_hub.error`` holds."""
    import datasets

    class Hub:
        calls: list = []
        error: BaseException = AssertionError("datasets.load_dataset must not be called")

    def fake(*args, **kw):
        Hub.calls.append(args)
        raise Hub.error

    Hub.calls = []
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return Hub


def test_source_neither_file_nor_hub_id_fails_at_once(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    assert reader_error("nosuch_no_ext") == (
        f"benchmark source 'nosuch_no_ext' is neither an existing file (looked for {tmp_path / 'nosuch_no_ext'}) nor "
        "a Hub dataset id 'owner/name'. Fix the path in the profile's 'benchmarks' (a relative path starts from the "
        "project folder, where make runs), or give a Hub id such as GBaker/MedQA-USMLE-4-options.")
    assert reader_error("data/nosuch.jsonl") == (
        f"benchmark file not found: {tmp_path / 'data' / 'nosuch.jsonl'}. Fix the path in the profile's 'benchmarks' "
        "(a relative path starts from the project folder, where make runs), or give a Hub dataset id 'owner/name'.")
    assert "looked for" in reader_error("package:medtune/assets/nosuch.jsonl")
    assert no_hub.calls == []


def test_hub_network_failure_is_one_message(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    no_hub.error = ConnectionError("Couldn't reach 'owner/nosuch' on the Hub (LocalEntryNotFoundError)")
    assert reader_error("owner/nosuch") == (
        "benchmark Hub dataset 'owner/nosuch': the Hugging Face Hub could not be reached (ConnectionError: Couldn't "
        "reach 'owner/nosuch' on the Hub (LocalEntryNotFoundError)). Check the network (or HF_ENDPOINT and proxy "
        "settings) and retry; to work offline, load it once where the Hub is reachable (it is then read from the "
        "cache with HF_HUB_OFFLINE=1), or save it as a JSONL file and give that path. No local file "
        f"{tmp_path / 'owner' / 'nosuch'} exists either.")
    assert no_hub.calls == [("owner/nosuch", None)]
    from datasets.exceptions import DatasetNotFoundError

    no_hub.error = DatasetNotFoundError("Dataset 'owner/gated' is a gated dataset on the Hub.")
    msg = reader_error("owner/gated")
    assert msg.startswith("benchmark Hub dataset 'owner/gated': not found (DatasetNotFoundError: Dataset "
                          "'owner/gated' is a gated dataset on the Hub). ") and "HF_TOKEN" in msg
    no_hub.error = ValueError('Unknown split "test". Should be one of [\'train\'].')
    assert reader_error("qiaojin/PubMedQA", config="pqa_labeled") == (
        "benchmark Hub dataset 'qiaojin/PubMedQA' (config 'pqa_labeled', split 'test'): ValueError: Unknown split "
        "\"test\". Should be one of ['train']. Give the right ones in the profile: {source: qiaojin/PubMedQA, "
        "config: ..., split: ...}.")


def test_validate_good_sources(bench_dir, no_hub):
    cfg = C.load(PARAMS / "smoke.yaml").replace(benchmarks={
        "illustrative": "package:medtune/assets/mc_medqa_style_illustrative.jsonl",
        "medqa": str(bench_dir / "medqa_usmle_4op_test.jsonl"),
        "pubmedqa": {"source": str(bench_dir / "pubmedqa_pqa_labeled_test.jsonl")},
        "hub": {"source": "qiaojin/PubMedQA", "config": "pqa_labeled", "split": "train"},
    })
    assert B.validate(cfg) == []
    assert no_hub.calls == []  # a Hub id: its shape only, no network
    assert B.validate(C.load(PARAMS / "default.yaml")) == []
    assert B.validate(cfg.replace(benchmarks={})) == []


def test_validate_reports_every_bad_source(tmp_path, monkeypatch, no_hub):
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)
    good = json.dumps(MEDQA_ROWS["shared file"])
    bad = json.dumps({**MEDQA_ROWS["shared file"], "choices": None})
    (tmp_path / "many.jsonl").write_text("\n".join([good] + [bad] * 22 + ["{oops"]) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    null_opt = bench_file(tmp_path, {"id": 1, "question": "Q?", "options": {"A": "x", "B": None}, "answer_idx": "B"},
                          "null_option.jsonl")
    cfg = SimpleNamespace(benchmarks={"ok": "package:medtune/assets/mc_pubmedqa_style_illustrative.jsonl",
                                      "many": "many.jsonl", "empty": "empty.jsonl", "typo": "nosuch_no_ext",
                                      "gone": "gone.jsonl", "null_opt": str(null_opt), "hub": "owner/name",
                                      "spec": {"path": "x.jsonl"}})
    problems = B.validate(cfg)
    null_choices = "'choices' is null, not a list of options."
    assert problems[:20] == [f"benchmarks.many: many.jsonl line {n}: {null_choices} {FIX_OPTIONS}"
                             for n in range(2, 22)]
    assert problems[20:] == [
        "benchmarks.many: ... and 3 more bad rows in many.jsonl (23 of 24).",
        "benchmarks.empty: empty.jsonl: no items (the file has no rows). Give a benchmark file with at least one item "
        "(one JSON object a line), or remove it from the profile's 'benchmarks'.",
        f"benchmarks.typo: benchmark source 'nosuch_no_ext' is neither an existing file (looked for "
        f"{tmp_path / 'nosuch_no_ext'}) nor a Hub dataset id 'owner/name'. Fix the path in the profile's 'benchmarks' "
        "(a relative path starts from the project folder, where make runs), or give a Hub id such as "
        "GBaker/MedQA-USMLE-4-options.",
        f"benchmarks.gone: benchmark file not found: {tmp_path / 'gone.jsonl'}. Fix the path in the profile's "
        "'benchmarks' (a relative path starts from the project folder, where make runs), or give a Hub dataset id "
        "'owner/name'.",
        f"benchmarks.null_opt: {null_opt} line 3: option B of 'options' has no text (null). Give option B its text; "
        "every option needs one.",
        "benchmarks.spec: benchmark spec {'path': 'x.jsonl'}: give a source (local JSONL, package:<pkg>/<file>, or "
        "Hub id) or {source: ..., config: ..., split: ..., language: ...}.",
    ]
    assert no_hub.calls == []
    # the limit does not hide a bad row past it: 04 would read only the first items, validate reads all
    assert len(B.read_benchmark("many.jsonl", limit=1)) == 1


def test_profile_keys_are_validated(tmp_path):
    cfg = C.load(PARAMS / "smoke.yaml")
    assert cfg.replace(benchmark_limit=3, benchmark_mode="generate", eval_questions=2).benchmark_limit == 3
    with pytest.raises(C.ConfigError, match="'benchmark_limit' must be at least 1"):
        cfg.replace(benchmark_limit=0)
    with pytest.raises(C.ConfigError, match="benchmark_mode' must be one of 'loglik', 'generate'"):
        cfg.replace(benchmark_mode="letters")
    with pytest.raises(C.ConfigError, match=r"benchmarks.medqa must be a source"):
        cfg.replace(benchmarks={"medqa": {"path": "x.jsonl"}})
    with pytest.raises(C.ConfigError, match="benchmark name 'med qa'"):
        cfg.replace(benchmarks={"med qa": "x.jsonl"})
    ok = cfg.replace(benchmarks={"pubmedqa": {"source": "qiaojin/PubMedQA", "config": "pqa_labeled", "split": "train"}})
    C.dump(ok, tmp_path / "c.yaml")
    assert C.load(tmp_path / "c.yaml") == ok
    zh = cfg.replace(benchmarks={"cmexam": {"source": "x.jsonl", "language": "zh"}})
    assert B.spec_of(zh.benchmarks["cmexam"]) == {"source": "x.jsonl", "config": None, "split": None, "language": "zh"}
    assert B.spec_of("x.jsonl")["language"] is None
    with pytest.raises(C.ConfigError, match=r"'benchmarks.cmexam.language' must be one of 'en', 'zh' \(the "
                                            r"benchmark's prompt and answer cues\), got 'cn'"):
        cfg.replace(benchmarks={"cmexam": {"source": "x.jsonl", "language": "cn"}})
    with pytest.raises(B.BenchmarkError, match="language must be one of en, zh, got 'cn'"):
        B.spec_of({"source": "x.jsonl", "language": "cn"})


# The Chinese item (a hand-written row in the BigBio QA layout; no Chinese benchmark file is in ../shared)
ZH_ROWS = [{"id": "zh1", "question": "急性缺血性脑卒中静脉溶栓应在发病后多长时间内进行？",
            "choices": ["2小时", "4小时内", "12小时内", "24小时内"],
            "answer": ["4小时内"]},
           {"id": "zh2", "question": "肝素过量应使用哪种药物拮抗？",
            "choices": ["维生素K", "鱼精蛋白", "纳洛酮", "氟马西尼"],
            "answer": ["鱼精蛋白"]}]


def zh_file(tmp_path) -> Path:
    path = tmp_path / "cmexam_style.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ZH_ROWS), encoding="utf-8")
    return path


def test_script_of_real_and_chinese_items(bench_dir, tmp_path):
    assert B.script_of(B.read_benchmark(str(bench_dir / "medqa_usmle_4op_test.jsonl"))) == ("en", 0.0)
    assert B.script_of(B.read_benchmark(str(bench_dir / "pubmedqa_pqa_labeled_test.jsonl"))) == ("en", 0.0)
    items = B.read_benchmark(str(zh_file(tmp_path)))
    assert items[0].answer == "B" and items[1].answer == "B"
    # letters: 24 + 13 ideographs in the questions, 11 + 14 in the options (digits are no letters); the one Latin
    # letter is the K of 维生素K
    assert B.script_of(items) == ("zh", round(62 / 63, 4))


def test_each_benchmark_is_scored_in_its_own_language(bench_dir, tmp_path, monkeypatch):
    """A Chinese set named language: zh in an English run gets the Chinese prompt and answer cue; the English set
    beside it keeps the run's; 00 warns about a set whose script does not match the language it is scored in."""
    from medtune.stages import preflight

    seen = []

    def fake(model, tokenizer, pairs, batch_size=4):
        seen.extend(pairs)
        return [0.0 if cont.strip() == "B" else -1.0 for _, cont in pairs]

    monkeypatch.setattr(B, "continuation_logprobs", fake)
    medqa = str(bench_dir / "medqa_usmle_4op_test.jsonl")
    zh = str(zh_file(tmp_path))
    cfg = C.load(PARAMS / "smoke.yaml").replace(
        benchmarks={"medqa": medqa, "cmexam": {"source": zh, "language": "zh"}}, benchmark_limit=2)
    assert cfg.language == "en"
    run = RunDir.create(cfg, root=tmp_path / "runs")
    results = B.measure(cfg, run, None, None, "baseline")
    assert (results["medqa"]["language"], results["cmexam"]["language"]) == ("en", "zh")
    english, chinese = seen[:8], seen[8:]  # 2 items x 4 options each
    assert len(chinese) == 8
    assert all("\n\nOptions:\nA. " in p and p.endswith("<think>\n</think>\nThe answer is") for p, _ in english)
    assert [c for _, c in english] == [" A", " B", " C", " D"] * 2
    assert all("选项：\nA. 2小时" in p or "选项：\nA. 维生素K" in p for p, _ in chinese[::4])
    assert all(p.endswith("<think>\n</think>\n答案是") for p, _ in chinese)
    assert [c for _, c in chinese] == ["A", "B", "C", "D"] * 2
    assert results["cmexam"]["correct"] == 2 and results["medqa"]["correct"] == 1  # "B": gold B, D of the real file
    assert preflight.check_benchmark_languages(cfg).status == "ok"
    # the same Chinese set without its language: scored with the English prompt, and 00 says so with the fix
    wrong = cfg.replace(benchmarks={"medqa": medqa, "cmexam": zh})
    check = preflight.check_benchmark_languages(wrong)
    assert check.status == "warning" and check.detail == (
        "benchmarks.cmexam: its items look Chinese (98% of their letters are CJK) but it is scored with the English "
        f"prompt and answer cues (language: en). Fix: give it its own language in the profile: benchmarks: "
        f"{{cmexam: {{source: {zh}, language: zh}}}}.")
    # and an English set scored in Chinese
    check = preflight.check_benchmark_languages(cfg.replace(benchmarks={"medqa": {"source": medqa, "language": "zh"}}))
    assert check.status == "warning" and check.detail.startswith(
        "benchmarks.medqa: its items look English (0% of their letters are CJK) but it is scored with the Chinese "
        "prompt and answer cues (language: zh).")


# ---------------------------------------------------------------------------------------------------------------
# Prompt and letter extraction
# ---------------------------------------------------------------------------------------------------------------

def test_mc_question_layout():
    assert B.mc_question(EXPECTED_MEDQA) == (
        "Which nerve is injured in wrist drop?\n\nOptions:\nA. Radial nerve\nB. Ulnar nerve\nC. Median nerve\n"
        "D. Axillary nerve\n\nAnswer with the letter of the correct option."
    )
    assert B.mc_question(EXPECTED_PUBMED) == (
        "Context:\nBackground paragraph.\nResults paragraph.\n\nQuestion:\nDoes X help?\n\nOptions:\nA. yes\nB. no\n"
        "C. maybe\n\nAnswer with the letter of the correct option."
    )
    prompt = B.mc_prompt(EXPECTED_MEDQA)
    assert "### Question:\nWhich nerve" in prompt and prompt.endswith("### Response:\n")


FOUR = ["Inhibition of proteasome", "Hyperstabilization of microtubules", "Generation of free radicals",
        "Cross-linking of DNA"]
YNM = ["yes", "no", "maybe"]
HOURS = ["2小时", "4小时内", "12小时内", "24小时内"]  # the Chinese options
XYZW = ["x", "y", "z", "w"]


@pytest.mark.parametrize("text, options, expected", [
    ("The answer is (C)", FOUR, "C"),
    ("C.", FOUR, "C"),
    ("C", FOUR, "C"),
    ("(B) Hyperstabilization of microtubules", FOUR, "B"),
    ("**C**\n\nbecause it damages DNA", FOUR, "C"),
    ("answer: c", FOUR, "C"),
    ("the answer is b.", FOUR, "B"),
    ("final answer = d", FOUR, "D"),
    ("**Answer: B**", FOUR, "B"),
    ("**Answer:** C", FOUR, "C"),
    ("The answer is: **A. Inhibition of proteasome**", FOUR, "A"),
    ("The correct option is (D) Cross-linking of DNA", FOUR, "D"),
    ("The answer is option B.", FOUR, "B"),
    ("答案是C", FOUR, "C"),
    ("答案：B。选项A是错误的，因为……", FOUR, "B"),
    ("答案是C选项", FOUR, "C"),
    ("综合分析，故选D", FOUR, "D"),
    # trailing explanation naming other letters after the final statement
    ("The answer is C. Option A is wrong because B and D act elsewhere.", FOUR, "C"),
    ("Answer: B\nA is tempting, but C and D do not fit.", FOUR, "B"),
    # the statement after </think> wins over the reasoning
    ("<think>Maybe the answer is A? No.</think>\nThe final answer is D", FOUR, "D"),
    ("The answer is Generation of free radicals.", FOUR, "C"),
    ("The answer is yes.", YNM, "A"),
    ("Answer: maybe", YNM, "C"),
    # unparseable
    ("A is unlikely, B is possible, C fits best, but D cannot be excluded.", FOUR, None),
    ("Option B seems right.", FOUR, None),  # a single letter named, but no statement
    ("The answer is B or C.", FOUR, None),
    ("The answer is a beta blocker.", FOUR, None),
    ("A 45-year-old man would need imaging.", FOUR, None),
    ("The answer is D", YNM, None),  # PubMedQA has no D
    ("The answer is not clear.", YNM, None),
    ("", FOUR, None),
    # echoes of the option list are not answers (issue 13)
    ("A. 2小时\nB. 4小时内\nC. 12小时内\nD. 24小时内", HOURS, None),
    ("Options:\nA. x\nB. y\nC. z\nD. w", XYZW, None),
    ("A. x B. y C. z D. w", XYZW, None),
    ("(A) x\n(B) y\n(C) z\n(D) w", XYZW, None),
    ("**A.** x\n**B.** y\n**C.** z\n**D.** w", XYZW, None),
    ("A\nB\nC\nD", XYZW, None),
    ("A.\nB.", XYZW, None),
    ("Answer:\nA. x\nB. y\nC. z\nD. w", XYZW, None),
    ("The answer is:\n\nA. yes\nB. no\nC. maybe", YNM, None),
    ("答案：\nA. 2小时\nB. 4小时内\nC. 12小时内\nD. 24小时内", HOURS, None),
    ("选项：\nA、2小时\nB、4小时内\nC、12小时内\nD、24小时内\n\n请用正确选项的字母作答。", HOURS, None),
    # ... but an answer next to an echo is read, and one option line is an answer
    ("A. 2小时\nB. 4小时内\nC. 12小时内\nD. 24小时内\n\n答案：D", HOURS, "D"),
    ("Options:\nA. x\nB. y\nC. z\nD. w\n\nThe answer is B.", XYZW, "B"),
    ("B. 4小时内\n\n因为溶栓时间窗为4.5小时。", HOURS, "B"),
    ("The answer is C.\n\nOptions:\nA. x\nB. y\nC. z\nD. w", XYZW, "C"),
    ("Answer: B. y", XYZW, "B"),
    ("C. 12小时内", HOURS, "C"),
])
def test_extract_choice(text, options, expected):
    assert B.extract_choice(text, options) == expected


ECHOES = {  # name -> the output of a model that only repeats the option list in some layout
    "lines": lambda i: "\n".join(f"{B.LETTERS[k]}. {o}" for k, o in enumerate(i.options)),
    "one line": lambda i: " ".join(f"{B.LETTERS[k]}. {o}" for k, o in enumerate(i.options)),
    "brackets": lambda i: "\n".join(f"({B.LETTERS[k]}) {o}" for k, o in enumerate(i.options)),
    "bold": lambda i: "\n".join(f"**{B.LETTERS[k]}.** {o}" for k, o in enumerate(i.options)),
    "after Answer:": lambda i: "Answer:\n" + "\n".join(f"{B.LETTERS[k]}. {o}" for k, o in enumerate(i.options)),
    "after 答案：": lambda i: "答案：\n" + "\n".join(f"{B.LETTERS[k]}、{o}" for k, o in enumerate(i.options)),
}


@pytest.mark.parametrize("echo", ECHOES)
def test_no_letter_from_an_echoed_option_list_of_the_real_items(bench_dir, echo):
    """Every one of the 1,773 real MedQA and PubMedQA items: its options repeated back are unparseable (HEAD before
    issue 13 read "A" from all 1,773 in every layout here), while an answer statement after the same echo, a
    statement naming the option's text, and one option line with its reason are read as the gold letter."""
    items = (B.read_benchmark(str(bench_dir / "medqa_usmle_4op_test.jsonl"))
             + B.read_benchmark(str(bench_dir / "pubmedqa_pqa_labeled_test.jsonl")))
    assert len(items) == 1773
    make = ECHOES[echo]
    assert [i.id for i in items if B.extract_choice(make(i), i.options) is not None] == []
    assert [i.id for i in items if B.extract_choice(make(i) + f"\n\nThe answer is {i.answer}.", i.options)
            != i.answer] == []
    if echo == "lines":
        text = {i.id: i.options[B.LETTERS.index(i.answer)] for i in items}
        assert [i.id for i in items if B.extract_choice(f"{i.answer}. {text[i.id]}\n\nIt fits best.", i.options)
                != i.answer] == []
        # the option's whole text wins over a leading capital that looks like a letter; MedQA item 709's options
        # are the letters "B", "C", "D", "E" themselves, so "The answer is B" stays the letter B
        misread = [(i.id, B.extract_choice(f"The answer is {text[i.id]}", i.options)) for i in items
                   if B.extract_choice(f"The answer is {text[i.id]}", i.options) != i.answer]
        assert misread == [("709", "B")]


def test_option_text_wins_over_a_capital_letter(bench_dir):
    """Real MedQA items whose option texts start with a capital that is also a letter ("A reduction ...", "D-dimer")."""
    items = {i.id: i for i in B.read_benchmark(str(bench_dir / "medqa_usmle_4op_test.jsonl"))}
    assert items["13"].options[3] == "A reduction in diastolic filling time" and items["13"].answer == "D"
    assert B.extract_choice("The answer is A reduction in diastolic filling time.", items["13"].options) == "D"
    assert items["543"].options[2] == "D-dimer"
    assert B.extract_choice("Answer: D-dimer", items["543"].options) == "C"
    assert B.extract_choice("Answer: D", items["543"].options) == "D"


def test_listed_letters():
    assert B.listed_letters("A. x", XYZW) == ["A"]
    assert B.listed_letters("**B.** y", XYZW) == ["B"]
    assert B.listed_letters("A. yes B. no C. maybe", YNM) == ["A", "B", "C"]
    assert B.listed_letters("C", XYZW) == ["C"]
    assert B.listed_letters("A 45-year-old man", FOUR) is None
    assert B.listed_letters("A. x is wrong", XYZW) is None
    assert B.listed_letters("E. v", XYZW) is None  # no fifth option
    assert B.listed_letters("", XYZW) is None


def test_answer_part():
    assert B.answer_part("<think>\nreasoning\n</think>\n The answer. ") == "The answer."
    assert B.answer_part("<think> a </think> b </think> c") == "c"
    assert B.answer_part("<think>\nunfinished reasoning") == "unfinished reasoning"
    assert B.answer_part("  plain answer\n") == "plain answer"


# ---------------------------------------------------------------------------------------------------------------
# Log-likelihood scoring on a tiny random Llama with the real Llama 4 tokenizer
# ---------------------------------------------------------------------------------------------------------------

ITEMS = [
    EXPECTED_MEDQA,
    B.MCItem(id="2", question="Antidote for heparin?", options=("Vitamin K", "Protamine sulfate", "Naloxone"),
             answer="B"),
]


@pytest.fixture(scope="module")
def tok(llama4_tokenizer):
    return llama4_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    return tiny_scoring_llama(tok, max_positions=512)


def hand_logprob(model, tok, prompt: str, continuation: str) -> float:
    """sum log p(continuation tokens) from one unpadded forward pass of prompt + continuation."""
    p_ids, full = tok(prompt)["input_ids"], tok(prompt + continuation)["input_ids"]
    assert full[:len(p_ids)] == p_ids  # the continuation starts a new token here
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), dim=-1)
    return sum(logp[pos - 1, full[pos]].item() for pos in range(len(p_ids), len(full)))


def test_letter_loglik_picks_the_hand_computed_argmax(model, tok):
    rows = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        preds = B.predict_loglik(model, tok, ITEMS, batch_size=4)
    finally:
        hook.remove()
    assert sum(rows) == 2  # each letter is one token: one sequence per item, not per option
    for item, pred in zip(ITEMS, preds, strict=True):
        prompt = B.mc_prompt(item) + B.ANSWER_PREFIX["en"]
        hand = [hand_logprob(model, tok, prompt, f" {B.LETTERS[i]}") for i in range(len(item.options))]
        assert all(len(tok(f" {B.LETTERS[i]}", add_special_tokens=False)["input_ids"]) == 1 for i in range(4))
        assert pred["scores"] == pytest.approx(hand, abs=2e-4)
        assert len(set(round(h, 3) for h in hand)) == len(hand)  # no ties: the argmax is meaningful
        assert pred["predicted"] == B.LETTERS[max(range(len(hand)), key=hand.__getitem__)]
        assert pred["correct"] == (pred["predicted"] == item.answer) and pred["parsed"] is True


def test_text_loglik_multi_token_options_batched(model, tok):
    """Option texts of several tokens, 7 sequences of different lengths in right-padded batches of 3."""
    preds = B.predict_loglik(model, tok, ITEMS, target="text", batch_size=3)
    for item, pred in zip(ITEMS, preds, strict=True):
        prompt = B.mc_prompt(item) + B.ANSWER_PREFIX["en"]
        hand = [hand_logprob(model, tok, prompt, f" {o}") for o in item.options]
        assert pred["scores"] == pytest.approx(hand, abs=2e-4)
        assert pred["predicted"] == B.LETTERS[max(range(len(hand)), key=hand.__getitem__)]


def test_loglik_follows_the_model(model, tok):
    """An LM head that favours the token " C": every item is answered C."""
    c_id = tok(" C", add_special_tokens=False)["input_ids"][0]

    def favour_c(module, args, logits):
        logits = logits.clone()
        logits[..., c_id] += 50.0
        return logits

    hook = model.get_output_embeddings().register_forward_hook(favour_c)
    try:
        preds = B.predict_loglik(model, tok, ITEMS, batch_size=1)
    finally:
        hook.remove()
    assert [p["predicted"] for p in preds] == ["C", "C"]
    summary = B.summarize(preds, ITEMS)
    assert summary == {"items": 2, "correct": 0, "accuracy": 0.0, "unparsed": 0, "unparsed_share": 0.0,
                       "chance": round((1 / 4 + 1 / 3) / 2, 4), "predicted_counts": {"C": 2},
                       "answer_counts": {"A": 1, "B": 1, "C": 0, "D": 0}, "predicted_spread": "A 0 · B 0 · C 2 · D 0",
                       "top_letter": "C", "top_share": 1.0,
                       "warning": "C is 2 of 2 readable predictions (100%), but the right answer of only 0 of 2 items "
                                  "(0%). The model hardly tells the options apart, so this accuracy mostly counts how "
                                  "often C is right; it is no sign of medical knowledge."}
    assert B.spread(summary) == "A 0 · B 0 · C 2 · D 0"


def test_continuation_logprobs_merging_boundary(model, tok):
    """A continuation that merges with the prompt's last token is scored from where the tokenizations diverge."""
    prompt, cont = "The answer is", "n't obvious"
    got = B.continuation_logprobs(model, tok, [(prompt, cont)])[0]
    p_ids, full = tok(prompt)["input_ids"], tok(prompt + cont)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(p_ids, full, strict=False)) if a != b), len(p_ids))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), dim=-1)
    assert got == pytest.approx(sum(logp[p - 1, full[p]].item() for p in range(start, len(full))), abs=2e-4)
    with pytest.raises(ValueError, match="adds no token"):
        B.continuation_logprobs(model, tok, [("abc", "")])


# ---------------------------------------------------------------------------------------------------------------
# Generation mode (the generator replaced by canned outputs), summaries, measure() and the anchor table
# ---------------------------------------------------------------------------------------------------------------

def test_predict_generate_counts_unparseable(monkeypatch):
    outputs = ["<think>x</think>\nThe answer is A", "B, C or maybe A", "answer: b"]
    items = [EXPECTED_MEDQA, EXPECTED_MEDQA, ITEMS[1]]

    def fake(model, tokenizer, rows, **kw):
        assert rows[0]["Question"] == B.mc_question(EXPECTED_MEDQA) and kw["max_new_tokens"] == 7
        return [{"row": r["row"], "question": r["Question"], "answer": o, "new_tokens": 3, "stopped": True}
                for r, o in zip(rows, outputs, strict=True)]

    monkeypatch.setattr("medtune.evaluation.heldout.generate_answers", fake)
    preds = B.predict_generate(None, None, items, max_new_tokens=7)
    assert [(p["predicted"], p["correct"], p["parsed"]) for p in preds] == [
        ("A", True, True), (None, False, False), ("B", True, True)]
    summary = B.summarize(preds, items)
    assert summary == {"items": 3, "correct": 2, "accuracy": 0.6667, "unparsed": 1, "unparsed_share": 0.3333,
                       "chance": round((1 / 4 + 1 / 4 + 1 / 3) / 3, 4),
                       "predicted_counts": {"A": 1, "B": 1, "unparsed": 1},
                       "answer_counts": {"A": 2, "B": 1, "C": 0, "D": 0},
                       "predicted_spread": "A 1 · B 1 · C 0 · D 0 · unreadable 1", "top_letter": "A", "top_share": 0.5,
                       "warning": None}
    assert B.spread(summary) == "A 1 · B 1 · C 0 · D 0 · unreadable 1"
    assert B.summarize([], []) == {"items": 0, "correct": 0, "accuracy": None, "unparsed": 0,
                                   "unparsed_share": None, "chance": None, "predicted_counts": {},
                                   "answer_counts": {}, "predicted_spread": "", "top_letter": None, "top_share": None,
                                   "warning": None}


def one_letter(n_items: int, predicted: list[str], answers: str):
    items = [B.MCItem(id=str(k), question="q", options=tuple(FOUR), answer=a) for k, a in enumerate(answers)]
    preds = [{"predicted": p, "parsed": p is not None, "correct": p == i.answer}
             for p, i in zip(predicted, items, strict=True)]
    assert len(items) == n_items
    return B.summarize(preds, items)


def test_one_letter_warning_at_90_percent():
    """The default model's log-likelihood on real 4-option sets put every prediction on D (issue 13). 20 items, 18 D
    (90%): warned; 17 D (85%): not. 10 items all D with D right 3 times: accuracy 0.3 above chance 0.25, warned."""
    answers = "ABCD" * 5
    at = one_letter(20, ["D"] * 18 + ["A", "B"], answers)
    assert (at["top_letter"], at["top_share"]) == ("D", 0.9)
    assert at["warning"].startswith("D is 18 of 20 readable predictions (90%), but the right answer of only 5 of 20 "
                                    "items (25%).")
    below = one_letter(20, ["D"] * 17 + ["A", "B", "C"], answers)
    assert (below["top_share"], below["warning"]) == (0.85, None)
    allD = one_letter(10, ["D"] * 10, "ABCDDDABCA")
    assert (allD["accuracy"], allD["chance"], allD["top_share"]) == (0.3, 0.25, 1.0)
    table = B.show({"medqa": {"mode": "loglik", "language": "en", **allD}})
    row = "| medqa | loglik | en | 10 | 3 | 0.3 | 0.25 | A 0 · B 0 · C 0 · D 10 | A 3 · B 2 · C 2 · D 3 | 0 (0.0) |"
    assert row in table
    assert ("**Warning, medqa:** D is 10 of 10 readable predictions (100%), but the right answer of only 3 of 10 items "
            "(30%).") in table
    # unreadable answers do not count as predictions: 9 D of 9 readable (one None) is still 100%
    gen = one_letter(10, ["D"] * 9 + [None], "ABCDDDABCA")
    assert (gen["top_share"], gen["unparsed"]) == (1.0, 1) and gen["warning"].startswith("D is 9 of 9 readable")
    assert one_letter(1, ["D"], "A")["warning"] is None  # one prediction says nothing about a spread


def test_measure_writes_predictions_and_summaries(model, tok, tmp_path, bench_dir):
    cfg = C.load(PARAMS / "smoke.yaml").replace(
        benchmarks={"medqa": str(bench_dir / "medqa_usmle_4op_test.jsonl")}, benchmark_limit=3, eval_batch_size=2)
    run = RunDir.create(cfg, root=tmp_path)
    results = B.measure(cfg, run, model, tok, "baseline")
    r = results["medqa"]
    assert r["items"] == 3 and r["mode"] == "loglik" and r["unparsed"] == 0 and r["chance"] == 0.25
    assert r["accuracy"] == round(r["correct"] / 3, 4)
    lines = B.load_predictions(B.predictions_path(run, "baseline", "medqa"))
    assert [p["answer"] for p in lines] == ["B", "D", "B"] and all(len(p["scores"]) == 4 for p in lines)
    assert sum(p["correct"] for p in lines) == r["correct"]
    assert r["language"] == "en" and "| medqa | loglik | en | 3 |" in B.show(results)
    assert B.measure(cfg.replace(benchmarks={}), run, model, tok, "baseline") == {}


def test_anchor_table(tmp_path):
    run = RunDir.create(C.load(PARAMS / "smoke.yaml"), root=tmp_path)
    run.record("baseline", {"benchmarks": {"medqa": {"accuracy": 0.25}}})
    run.record("finetuned", {"benchmarks": {"medqa": {"accuracy": 0.3125}}})
    md = B.anchor_table(run)
    assert md.startswith("**Context, not a target.**") and "different, larger model" in md
    assert "| MedQA (USMLE, 4 options) | 25.0 | 31.2 | 58.7 | 69.0 |" in md
    assert "| PubMedQA (yes/no/maybe) | not measured | not measured | 75.2 | 77.7 |" in md
    assert not math.isnan(B.PAPER_ANCHOR["medqa"]["after_sft"])
