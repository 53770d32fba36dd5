"""Bad input, met early and named: rows with missing, empty, null or non-string fields, duplicates, examples longer
than ``sft.max_length`` tokens, files that are not JSONL at all; and profiles whose settings cannot work together.
Each bad row is counted and reported by its line number; ``bad_rows: fail`` stops at once, ``bad_rows: skip``
leaves the rows out and lists them (printed in 03, recorded in metrics.json) -- never a silent drop, never a crash
deep in tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medtune.settings import config as C
from medtune.settings.runs import RunDir
from medtune.stages import data as D

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params"


def row(q: str, cot: str = "First, consider the usual causes.", resp: str = "The answer is B.") -> dict:
    return {"Question": q, "Complex_CoT": cot, "Response": resp}


# Line numbers below are the file's: two blank lines (2 and 10) are counted.
MIXED = [
    json.dumps(row("q1")),                                          # 1 ok
    "",                                                             # 2 blank
    json.dumps(row("q2")),                                          # 3 ok
    "{not json",                                                    # 4
    json.dumps({"Question": "q3", "Complex_CoT": "c"}),             # 5 Response missing
    json.dumps(row("q4", cot="   ")),                               # 6 empty
    json.dumps(row("q5", resp=None)),                               # 7 null
    json.dumps(row(5)),                                             # 8 int
    json.dumps(row("  q1 ")),                                       # 9 duplicate of line 1
    "",                                                             # 10 blank
    json.dumps(["Question", "Complex_CoT", "Response"]),            # 11 not an object
    json.dumps({"Question": None, "Complex_CoT": 3, "Response": ""}),  # 12 three problems in one row
    json.dumps(row("q6")),                                          # 13 ok
]
EXPECTED = [
    (4, "not valid JSON (Expecting property name enclosed in double quotes, column 2)"),
    (5, "field 'Response' is missing"),
    (6, "field 'Complex_CoT' is empty"),
    (7, "field 'Response' is null"),
    (8, "field 'Question' is int, not a string"),
    (9, "duplicate of line 1 (same Question)"),
    (11, "expected a JSON object with Question, Complex_CoT, Response, got list"),
    (12, "field 'Question' is null; field 'Complex_CoT' is int, not a string; field 'Response' is empty"),
]


def write(tmp_path: Path, lines: list[str], name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Bad rows
# ---------------------------------------------------------------------------------------------------------------

def test_bad_rows_fail_lists_every_bad_line_at_once(tmp_path):
    path = write(tmp_path, MIXED)
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))  # bad_rows: fail is the default
    msg = str(err.value)
    assert msg.startswith(f"{path}: 8 of 11 rows cannot be used (bad_rows: fail), by line number:\n")
    for line, why in EXPECTED:
        assert f"  line {line}: {why}\n" in msg
    assert "set bad_rows: skip" in msg


def test_bad_rows_skip_keeps_the_good_rows_and_reports_each_skipped_one(tmp_path, capsys):
    path = write(tmp_path, MIXED)
    report = D.RowReport()
    rows = D.load_rows(str(path), bad_rows="skip", report=report)
    assert [r["Question"] for r in rows] == ["q1", "q2", "q6"]
    assert report.kept == [0, 1, 10]  # dataset indices (non-blank lines, bad ones counted)
    summary = report.summary()
    assert summary == {"policy": "skip", "read": 11, "skipped": 8,
                       "skipped_rows": [{"line": n, "reason": why} for n, why in EXPECTED]}
    out = capsys.readouterr().out
    assert out.startswith(f"skipped 8 of 11 rows of {path} (bad_rows: skip), by line number:")
    assert all(f"line {n}: {why}" in out for n, why in EXPECTED)


def test_unknown_policy_is_an_error():
    with pytest.raises(D.DataError, match="bad_rows must be one of"):
        D.validate_rows([row("a")], "x", bad_rows="drop")


def test_rows_from_a_hub_dataset_are_numbered_by_position(tmp_path):
    """``datasets`` gives missing fields as None; rows have no line numbers, so they are named by position."""
    with pytest.raises(D.DataError) as err:
        D.validate_rows([row("a"), row("b", resp=None), row("a")], "Org/medical")
    msg = str(err.value)
    assert "by row number" in msg and "row 2: field 'Response' is null" in msg
    assert "row 3: duplicate of row 1 (same Question)" in msg


def test_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(row("a")).encode() + b"\n"
                     + '{"Question": "caf\xe9", "Complex_CoT": "c", "Response": "r"}'.encode("latin-1") + b"\n"
                     + json.dumps(row("b")).encode() + b"\n")
    with pytest.raises(D.DataError, match=r"line 2: not UTF-8 text \(byte 0xe9"):
        D.load_rows(str(path))
    assert len(D.load_rows(str(path), bad_rows="skip")) == 2


SURROGATE = ("field 'Question' is not valid Unicode (lone surrogate \\ud800 at character 1; remove it, or write the "
             "character or its whole surrogate pair)")


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_lone_surrogate_escape_is_a_bad_row_not_a_tokenizer_crash(tmp_path, policy, llama4_tokenizer, capsys):
    """``"\\ud800 x"`` is valid JSON but not valid Unicode; the tokenizer (the length check) would raise TypeError."""
    lines = [json.dumps(row("a")), '{"Question": "\\ud800 x", "Complex_CoT": "c", "Response": "r"}',
             json.dumps(row("b", resp="ok \ud83d\ude00"))]  # a whole pair (an emoji) is fine
    path = write(tmp_path, lines)
    lengths = D.token_lengths(llama4_tokenizer)
    if policy == "fail":
        with pytest.raises(D.DataError) as err:
            D.load_rows(str(path), lengths=lengths, max_length=4096)
        msg = str(err.value)
        assert msg.startswith(f"{path}: 1 of 3 rows cannot be used (bad_rows: fail), by line number:\n")
        assert f"  line 2: {SURROGATE}\n" in msg and "Fix them in the data, or set bad_rows: skip" in msg
    else:
        report = D.RowReport()
        rows = D.load_rows(str(path), bad_rows="skip", lengths=lengths, max_length=4096, report=report)
        assert [r["Question"] for r in rows] == ["a", "b"] and rows[1]["Response"] == "ok \U0001f600"
        assert report.summary()["skipped_rows"] == [{"line": 2, "reason": SURROGATE}]
        assert f"line 2: {SURROGATE}" in capsys.readouterr().out


def test_lone_surrogate_is_named_in_every_field_at_its_position():
    bad = {"Question": "ok", "Complex_CoT": "ab\udfff", "Response": "\ud83d"}
    with pytest.raises(D.DataError) as err:
        D.validate_rows([row("a"), bad], "x.json")
    msg = str(err.value)
    assert "row 2: field 'Complex_CoT' is not valid Unicode (lone surrogate \\udfff at character 3; " in msg
    assert "; field 'Response' is not valid Unicode (lone surrogate \\ud83d at character 1; " in msg


def test_cr_only_line_endings_are_read_by_line(tmp_path):
    """Old Mac files end lines with CR only; they are read line by line (numbers as an editor shows them)."""
    path = tmp_path / "mac.jsonl"
    lines = [json.dumps(row("a")), "", "{oops", json.dumps(row("b", resp="caf\u00e9"))]
    path.write_bytes("\r".join(lines).encode() + b"\r")
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))
    assert f"{path}: 1 of 3 rows cannot be used" in str(err.value)
    assert "  line 3: not valid JSON (Expecting property name enclosed in double quotes, column 2)\n" in str(err.value)
    rows = D.load_rows(str(path), bad_rows="skip")
    assert rows == [row("a"), row("b", resp="caf\u00e9")]
    crlf = tmp_path / "windows.jsonl"  # CRLF and LF files keep reading by LF
    crlf.write_bytes(b"\r\n".join(json.dumps(row(q)).encode() for q in "ab") + b"\r\n")
    assert D.load_rows(str(crlf)) == [row("a"), row("b")]


def test_all_rows_bad_with_skip_says_why_nothing_is_left(tmp_path):
    path = write(tmp_path, [json.dumps(row("a", cot="")), json.dumps(row("b", cot="")), json.dumps(row("c"))])
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path), bad_rows="skip")
    assert "1 usable rows of 3" in str(err.value) and "skipped as bad rows" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Files that are not JSONL at all: fatal whatever bad_rows says, with what the file is and how to convert it
# ---------------------------------------------------------------------------------------------------------------

NOT_JSONL = {
    "parquet": (b"PAR1\x15\x04\x15\x10\x00\x00garbage", "a binary Parquet file, not JSONL text. Convert it to JSONL"),
    "nul-bytes": (b"\x00\x01\x02\x03binary", "a binary file (it contains NUL bytes)"),
    "json-array": (json.dumps([row("a"), row("b")], indent=1).encode(),
                   "a JSON array (one document), not JSONL. Rename it to .json"),
    "one-line-array": (json.dumps([row("a"), row("b")]).encode(), "a JSON array (one document), not JSONL"),
    "csv": (b"Question,Complex_CoT,Response\nWhat?,Think,Answer\n",
            "CSV/TSV, not JSONL (first line: 'Question,Complex_CoT,Response'). Convert it to JSONL"),
    "tsv": (b"Question\tComplex_CoT\tResponse\nWhat?\tThink\tAnswer\n", "CSV/TSV, not JSONL"),
    "pretty-json": (json.dumps(row("a"), indent=2).encode(), "one JSON object spread over 5 lines, not JSONL"),
    "plain-text": (b"Question: what?\nAnswer: this\n", "no line is JSON (2 non-blank lines; line 1: not valid JSON"),
}
_ROWS_TEXT = "\n".join(json.dumps(row(q), ensure_ascii=False) for q in ("发热三天？", "b")) + "\n"
_WIDE = {  # name: (Python codec, what the message calls it, iconv's -f)
    "utf-16-bom": ("utf-16", "UTF-16 encoded (UTF-16LE, with a byte-order mark)", "UTF-16"),
    "utf-16le": ("utf-16-le", "UTF-16 encoded (UTF-16LE)", "UTF-16LE"),
    "utf-16be": ("utf-16-be", "UTF-16 encoded (UTF-16BE)", "UTF-16BE"),
    "utf-32-bom": ("utf-32", "UTF-32 encoded (UTF-32LE, with a byte-order mark)", "UTF-32"),
    "utf-32be": ("utf-32-be", "UTF-32 encoded (UTF-32BE)", "UTF-32BE"),
}
for _name, (_codec, _what, _iconv) in _WIDE.items():
    NOT_JSONL[_name] = (_ROWS_TEXT.encode(_codec), f"the file is {_what}, not UTF-8: save it as UTF-8, e.g. iconv -f "
                                                   f"{_iconv} -t UTF-8 ")


@pytest.mark.parametrize("policy", ["fail", "skip"])
@pytest.mark.parametrize("kind", list(NOT_JSONL), ids=list(NOT_JSONL))
def test_file_that_is_not_jsonl(tmp_path, kind, policy):
    content, words = NOT_JSONL[kind]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path), bad_rows=policy)
    assert str(err.value).startswith(f"{path}: ") and words in str(err.value), str(err.value)


def test_utf16_message_names_the_file_in_the_fix(tmp_path):
    path = tmp_path / "rows.json"  # a .json file in UTF-16 is no JSON array to read either
    path.write_bytes(json.dumps([row("a"), row("b")]).encode("utf-16"))
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))
    assert str(err.value) == (f"{path}: the file is UTF-16 encoded (UTF-16LE, with a byte-order mark), not UTF-8: save "
                              f"it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8 {path} > rows.jsonl (or in the editor: save "
                              "with encoding UTF-8).")


def test_json_array_file_named_json_is_read_by_position(tmp_path, capsys):
    """The Hub's medical_o1_sft.json is one JSON array; as a .json file it is read, its rows numbered 1, 2, ..."""
    path = tmp_path / "medical_o1_sft.json"
    path.write_text(json.dumps([row("a"), row("b"), row("a"), {"Question": "c"}], indent=1), encoding="utf-8")
    report = D.RowReport()
    rows = D.load_rows(str(path), bad_rows="skip", report=report)
    assert [r["Question"] for r in rows] == ["a", "b"]
    assert report.summary()["skipped_rows"] == [
        {"row": 3, "reason": "duplicate of row 1 (same Question)"},
        {"row": 4, "reason": "field 'Complex_CoT' is missing; field 'Response' is missing"}]


def test_run_files_stay_strict(tmp_path):
    """The run's own JSONL files (data/train.jsonl, answers) are read whole: the first bad line is an error."""
    path = write(tmp_path, [json.dumps({"a": 1}), "", "{oops"])
    with pytest.raises(D.DataError, match=r"line 3: not valid JSON"):
        D.read_jsonl(path)
    assert D.read_jsonl(write(tmp_path, [json.dumps({"a": 1}), "", json.dumps([1])], "ok.jsonl")) == [{"a": 1}, [1]]


# ---------------------------------------------------------------------------------------------------------------
# Over-long examples, measured with the tokenizer in data.prepare (notebook 03)
# ---------------------------------------------------------------------------------------------------------------

LONG_COT = "The patient's history, examination and labs each point somewhere different. " * 60


def long_profile(tmp_path: Path, policy: str) -> C.RunConfig:
    lines = [json.dumps(row(f"Question {i}?", cot=LONG_COT if i in (3, 6) else "Short reasoning.")) for i in range(12)]
    lines.insert(5, "")  # a blank line: rows 5.. sit one line further down
    data = write(tmp_path, lines)
    d = yaml.safe_load((PARAMS / "smoke.yaml").read_text(encoding="utf-8"))
    d.update(dataset=str(data), max_rows=None, heldout_rows=[0, 3], heldout_size=3, bad_rows=policy)
    d["sft"]["max_length"] = 256
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(d), encoding="utf-8")
    return C.load(tmp_path / "p.yaml")


def test_overlong_examples_fail_with_their_lines_and_lengths(tmp_path, llama4_tokenizer):
    cfg = long_profile(tmp_path, "fail")
    run = RunDir.create(cfg, root=tmp_path / "outputs")
    with pytest.raises(D.DataError) as err:
        D.prepare(cfg, run, llama4_tokenizer)
    msg = str(err.value)
    assert "2 of 12 rows cannot be used (bad_rows: fail)" in msg
    n = D.token_lengths(llama4_tokenizer)([row("Question 3?", cot=LONG_COT)])[0]
    assert n > 256
    assert f"line 4: {n:,} tokens, longer than sft.max_length 256 (truncation would cut the answer and the EOS)" in msg
    assert "line 8:" in msg  # row 6 is on line 8 (after the blank line 6)
    assert "raise sft.max_length" in msg
    assert not run.train_data_path.exists()  # nothing half-written


def test_overlong_examples_skipped_are_reported_and_held_out_rows_keep_their_index(tmp_path, llama4_tokenizer, capsys):
    cfg = long_profile(tmp_path, "skip")
    run = RunDir.create(cfg, root=tmp_path / "outputs")
    summary = D.prepare(cfg, run, llama4_tokenizer)
    out = capsys.readouterr().out
    assert "skipped 2 of 12 rows" in out and "line 4: " in out and "line 8: " in out
    assert "heldout row 3 was skipped as a bad row" in out
    assert (summary["rows"], summary["train"], summary["heldout"]) == (10, 7, 3)
    assert summary["bad_rows"]["skipped"] == 2 and [r["line"] for r in summary["bad_rows"]["skipped_rows"]] == [4, 8]
    train, held = D.read_split(run)
    assert summary["heldout_rows"][0] == 0 and 3 not in summary["heldout_rows"]
    everything = {r["row"] for r in train} | {r["row"] for r in held}
    assert everything == set(range(12)) - {3, 6}  # dataset indices, not positions among the rows kept
    for r in held:
        assert r["Question"] == f"Question {r['row']}?"
    for r in train:
        assert f"Question {r['row']}?" in r["prompt"]
    # notebook 03 records its summary (all but first_text) in metrics.json's "data" section
    run.record("data", {k: v for k, v in summary.items() if k != "first_text"})
    recorded = run.metrics()["data"]["bad_rows"]
    assert recorded["policy"] == "skip" and recorded["skipped_rows"][0]["line"] == 4
    assert "tokens, longer than sft.max_length 256" in recorded["skipped_rows"][0]["reason"]
    import nbformat

    nb03 = nbformat.read(ROOT / "notebooks" / "03_format_prompts.ipynb", as_version=4)
    assert any('run.record("data", {k: v for k, v in summary.items() if k != "first_text"}' in c.source
               for c in nb03.cells)


def test_many_skipped_rows_are_counted_listed_first_and_written_whole_to_the_run(tmp_path, capsys):
    """1,000 bad rows with bad_rows: skip: the summary (printed in 03, recorded in metrics.json) counts them all and
    lists the first LISTED; data/skipped_rows.jsonl in the run holds every one, number and reason."""
    lines = [json.dumps(row(f"Question {i}?")) for i in range(12)] + ["{oops"] * 1000
    d = yaml.safe_load((PARAMS / "smoke.yaml").read_text(encoding="utf-8"))
    d.update(dataset=str(write(tmp_path, lines)), max_rows=None, bad_rows="skip")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(d), encoding="utf-8")
    cfg = C.load(tmp_path / "p.yaml")
    run = RunDir.create(cfg, root=tmp_path / "outputs")
    tokenizer = type("EosOnly", (), {"eos_token": "</s>"})()  # not callable: no length check
    summary = D.prepare(cfg, run, tokenizer)["bad_rows"]
    why = "not valid JSON (Expecting property name enclosed in double quotes, column 2)"
    assert run.skipped_rows_path == run.path / "data" / "skipped_rows.jsonl"
    assert summary == {"policy": "skip", "read": 1012, "skipped": 1000,
                       "skipped_rows": [{"line": n, "reason": why} for n in range(13, 13 + D.LISTED)],
                       "skipped_rows_more": f"and {1000 - D.LISTED:,} more: all 1,000 are in {run.skipped_rows_path}",
                       "skipped_rows_file": str(run.skipped_rows_path)}
    assert D.read_jsonl(run.skipped_rows_path) == [{"line": n, "reason": why} for n in range(13, 1013)]
    out = capsys.readouterr().out
    assert f"all 1,000 skipped rows (number and reason, one a line): {run.skipped_rows_path}" in out
    run.record("data", {"bad_rows": summary})
    assert run.metrics_path.stat().st_size < 10_000  # not the whole list
    # a later 03 of the run with nothing skipped leaves no stale list behind
    clean = cfg.replace(dataset=str(write(tmp_path, lines[:12], "clean.jsonl")))
    assert "skipped_rows_file" not in D.prepare(clean, run, tokenizer)["bad_rows"]
    assert not run.skipped_rows_path.exists()


def test_too_few_rows_left_still_keeps_the_whole_skipped_list(tmp_path):
    lines = [json.dumps(row("only one"))] + ["{oops"] * 30
    d = yaml.safe_load((PARAMS / "smoke.yaml").read_text(encoding="utf-8"))
    d.update(dataset=str(write(tmp_path, lines)), max_rows=None, bad_rows="skip")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(d), encoding="utf-8")
    cfg = C.load(tmp_path / "p.yaml")
    run = RunDir.create(cfg, root=tmp_path / "outputs")
    with pytest.raises(D.DataError) as err:
        D.prepare(cfg, run, type("EosOnly", (), {"eos_token": "</s>"})())
    assert "1 usable rows of 31" in str(err.value)
    assert str(err.value).endswith(f"All 30 skipped rows (number and reason) are in {run.skipped_rows_path}.")
    assert len(D.read_jsonl(run.skipped_rows_path)) == 30


def test_token_lengths_are_what_trl_trains_on(llama4_tokenizer):
    """The length check counts the tokens TRL's SFTTrainer makes of a prompt-completion pair (trl 1.16:
    ``tokenizer(text=prompt + completion)``, special tokens included), so "fits" means nothing is truncated."""
    from trl.data_utils import _tokenize

    r = row("What is the first-line treatment?", cot=LONG_COT[:400])
    ex = D.train_example(r, llama4_tokenizer.eos_token)
    expected = len(_tokenize(llama4_tokenizer, ex["prompt"] + ex["completion"])["input_ids"])
    assert D.token_lengths(llama4_tokenizer)([r]) == [expected]


# ---------------------------------------------------------------------------------------------------------------
# Bad parameters: errors at load of the profile, naming the key and the fix
# ---------------------------------------------------------------------------------------------------------------

def profile_with(tmp_path: Path, **sections) -> Path:
    d = yaml.safe_load((PARAMS / "scout.yaml").read_text(encoding="utf-8"))
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(d), encoding="utf-8")
    return path


EXPERTS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


@pytest.mark.parametrize("changes,words", [
    ({"lora": {"target_parameters": EXPERTS}, "llama4_fast": False},
     ["'lora.lora_dropout' is 0.05", "'lora.target_parameters' puts LoRA on the routed experts", "lora_dropout: 0"]),
    ({"lora": {"target_parameters": EXPERTS}, "llama4_fast": True},
     ["'lora.lora_dropout' is 0.05", "'lora.target_parameters' puts LoRA on the routed experts", "lora_dropout: 0"]),
    ({"bad_rows": "drop"}, ["key 'bad_rows' must be one of 'skip', 'fail', got 'drop'"]),
    ({"bad_row": "skip"}, ["unknown key 'bad_row'", "Did you mean 'bad_rows'?"]),
    ({"sft": {"max_length": "2048"}}, ["'sft.max_length' must be int or null, got '2048'", "(remove the quotes)"]),
    ({"lora": {"lora_dropout": "0.05"}}, ["'lora.lora_dropout' must be float, got '0.05'"]),
    # a typo in target_parameters: PEFT only warns (or, with one good entry beside it, says nothing) and trains
    # without that LoRA
    ({"lora": {"lora_dropout": 0.0, "target_parameters": ["feed_forward.expert.gate_up_proj"]}},
     ["entry 'feed_forward.expert.gate_up_proj' names no parameter",
      "Did you mean 'feed_forward.experts.gate_up_proj'"]),
    ({"lora": {"lora_dropout": 0.0, "target_parameters": [EXPERTS[0], "feed_forward.experts.down_prj"]}},
     ["entry 'feed_forward.experts.down_prj'", "Did you mean 'feed_forward.experts.down_proj'"]),
    ({"lora": {"lora_dropout": 0.0, "target_parameters": [1, 2]}}, ["entry 1 names no parameter"]),
    ({"lora": {"rank_pattern": {"feed_forward\\.experts\\.(gate_up": 16}}},
     ["'lora.rank_pattern' entry", "is not a valid regular expression", "missing )"]),
    ({"lora": {"rank_pattern": {"experts": "sixteen"}}}, ["maps to 'sixteen'", "an integer >= 1"]),
    ({"lora": {"rank_pattern": {"experts": 0}}}, ["maps to 0", "an integer >= 1"]),
    ({"lora": {"rank_pattern": {"experts": 16.5}}}, ["maps to 16.5"]),
    ({"lora": {"alpha_pattern": {"(": 16}}}, ["'lora.alpha_pattern' entry '('", "not a valid regular expression"]),
    ({"lora": {"lora_dropout": 0.0, "use_dora": True, "target_parameters": EXPERTS}},
     ["'lora.use_dora: true' with 'lora.target_parameters'", "use_dora: false"]),
    ({"sft": {"packing": True, "packing_strategy": "wrapped"}},
     ["'sft.packing_strategy' is 'wrapped'", "attends to its neighbours", "packing_strategy: bfd"]),
    ({"sft": {"packing": True, "packing_strategy": "bdf"}}, ["'bdf', which is not a TRL 1.16 strategy"]),
    ({"sft": {"packing": True, "max_length": None}}, ["'sft.max_length' is null", "max_length: 4096"]),
])
def test_impossible_or_mistyped_settings_fail_at_load(tmp_path, changes, words):
    path = profile_with(tmp_path, **changes)
    with pytest.raises(C.ConfigError) as err:
        C.load(path)
    for w in words:
        assert w in str(err.value), str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("fast", [False, True])  # bf16 experts, or NF4 experts (medtune.llama4.expert_lora)
def test_lora_on_experts_loads_when_the_combination_works(tmp_path, fast):
    cfg = C.load(profile_with(tmp_path, lora={"target_parameters": EXPERTS, "lora_dropout": 0.0}, llama4_fast=fast))
    assert cfg.lora["target_parameters"] == EXPERTS and cfg.bad_rows == "fail" and cfg.llama4_fast is fast
    lora = C.lora_config(cfg)
    assert sorted(lora.target_parameters) == sorted(EXPERTS) and lora.lora_dropout == 0.0
