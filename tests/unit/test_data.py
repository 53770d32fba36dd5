"""medtune.stages.data on the real medical-o1 rows and the real Llama 4 tokenizer: reading, held-out split, templates,
the padding token, bad input, and notebook 03's ``prepare``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune.settings import config as C
from medtune.settings.runs import RunDir
from medtune.stages import data as D
from medtune.stages.modeling import ensure_distinct_pad

PARAMS = Path(__file__).resolve().parents[2] / "params"
EOT, EOT_ID = "<|eot|>", 200008
PAD, PAD_ID = "<|finetune_right_pad|>", 200018
SAMPLE = "package:medtune/assets/medical_reasoning_illustrative.jsonl"


@pytest.fixture(scope="module")
def real_path(shared) -> Path:
    path = shared / "data" / "medical-o1" / "medical_o1_sft_en_604.jsonl"
    if not path.is_file():
        pytest.fail(f"real data missing: {path} (see shared/data/README.md)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def real_rows(real_path) -> list[dict]:
    return D.load_rows(str(real_path))


def write_lines(tmp_path: Path, lines: list[str], name: str = "rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(q="What causes X?", cot="First, consider Y.", resp="X is caused by Y.") -> dict:
    return {"Question": q, "Complex_CoT": cot, "Response": resp}


# ---------------------------------------------------------------------------------------------------------------
# Reading the real rows
# ---------------------------------------------------------------------------------------------------------------

def test_load_rows_reads_all_604_real_rows(real_rows, real_path):
    assert len(real_rows) == 604
    for r in real_rows:
        assert tuple(r) == D.FIELDS
        assert all(isinstance(r[f], str) and r[f].strip() for f in D.FIELDS)
    first = json.loads(real_path.read_text(encoding="utf-8").splitlines()[0])
    assert real_rows[0] == {f: first[f] for f in D.FIELDS}
    assert len({r["Question"] for r in real_rows}) == 604  # deduplicated on Question (shared/data/README.md)


def test_load_rows_max_rows_keeps_the_first(real_rows, real_path):
    head = D.load_rows(str(real_path), max_rows=10)
    assert head == real_rows[:10]


def test_package_sample_reads_64_rows():
    rows = D.load_rows(SAMPLE)
    assert len(rows) == 64
    assert all(tuple(r) == D.FIELDS for r in rows)
    assert len({r["Question"] for r in rows}) == 64


def test_package_not_installed_is_data_error():
    with pytest.raises(D.DataError, match="package 'no_such_pkg_medtune' is not installed"):
        D.load_rows("package:no_such_pkg_medtune/rows.jsonl")


def test_missing_file_is_data_error(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))
    assert str(path) in str(err.value) and "not found" in str(err.value)


EXPECTED_SOURCES = ("a JSONL file (one JSON object a line with Question, Complex_CoT, Response), a Hub dataset id "
                    "owner/name (e.g. FreedomIntelligence/medical-o1-reasoning-SFT), a folder holding a downloaded Hub "
                    "dataset (JSONL, JSON or Parquet files; its README.md names the configs), or package:<pkg>/<file>")


@pytest.mark.parametrize("given", ["", "   "])
def test_empty_dataset_setting_is_data_error(given):
    """``dataset: ""`` used to reach datasets/load.py (``Path("")`` is the working folder) and fail with IndexError."""
    with pytest.raises(D.DataError) as err:
        D.load_rows(given)
    assert str(err.value) == (f"dataset is {given!r}: nothing to read. Set dataset: in the profile to "
                              f"{EXPECTED_SOURCES}.")


@pytest.mark.parametrize("contents", [[], ["README.md"]], ids=["empty", "readme-only"])
def test_folder_without_data_files_is_data_error(tmp_path, contents):
    """Was the datasets library's EmptyDatasetError."""
    folder = tmp_path / "mydata"
    folder.mkdir()
    for name in contents:
        (folder / name).write_text("# my data\n", encoding="utf-8")
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(folder))
    msg = str(err.value)
    assert msg.startswith(f"{folder}: the folder holds no data files (in it: {', '.join(contents) or 'nothing'}; ")
    assert msg.endswith(f"Give {EXPECTED_SOURCES}.")


def test_folder_with_a_file_that_does_not_parse_names_it(tmp_path, monkeypatch):
    """A bad line in a dataset folder's file was the datasets library's DatasetGenerationError."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "mydata"
    folder.mkdir()
    write_lines(folder, [json.dumps(row()), "{not json"], "train.jsonl")
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(folder))
    msg = str(err.value)
    assert msg.startswith(f"{folder}: a data file in the folder cannot be read (ArrowInvalid: JSON parse error: ")
    assert msg.endswith(f"files: train.jsonl). Give the file itself as dataset: (e.g. {folder / 'train.jsonl'}) to "
                        "have each bad row listed by line, or fix the file.")


# ---------------------------------------------------------------------------------------------------------------
# Held-out split
# ---------------------------------------------------------------------------------------------------------------

def test_split_heldout_on_real_rows(real_rows):
    train, held = D.split_heldout(real_rows, (0, 10), 8, seed=42)
    held_ids = [r["row"] for r in held]
    train_ids = [r["row"] for r in train]
    assert len(held) == 8 and held_ids[:2] == [0, 10]
    assert held_ids[2:] == sorted(held_ids[2:])
    assert not set(held_ids) & set(train_ids)
    assert sorted(held_ids + train_ids) == list(range(604))
    assert len(train) == 596
    assert train_ids == sorted(train_ids)  # training rows keep dataset order
    for r in held + train:  # each row is the dataset row it names, plus "row"
        assert {k: r[k] for k in D.FIELDS} == real_rows[r["row"]]


def test_split_is_deterministic_per_seed(real_rows):
    a = D.split_heldout(real_rows, (0, 10), 8, seed=42)
    b = D.split_heldout(real_rows, (0, 10), 8, seed=42)
    c = D.split_heldout(real_rows, (0, 10), 8, seed=7)
    assert a == b
    held_a = {r["row"] for r in a[1]}
    held_c = {r["row"] for r in c[1]}
    assert held_a != held_c
    assert {0, 10} <= held_c


def test_split_duplicate_heldout_rows_count_once(real_rows):
    train, held = D.split_heldout(real_rows, (10, 0, 10), 3, seed=1)
    assert [r["row"] for r in held][:2] == [10, 0]
    assert len(held) == 3 and len(train) == 601


def test_split_row_past_the_end_names_it(real_rows):
    with pytest.raises(D.DataError) as err:
        D.split_heldout(real_rows, (0, 604), 8, seed=42)
    assert "[604]" in str(err.value)
    assert "604 rows" in str(err.value)


def test_split_leaving_no_training_rows(real_rows):
    with pytest.raises(D.DataError, match="heldout_size 604"):
        D.split_heldout(real_rows, (0,), 604, seed=42)


# ---------------------------------------------------------------------------------------------------------------
# Templates with the real Llama 4 tokenizer
# ---------------------------------------------------------------------------------------------------------------

def test_llama4_tokenizer_special_tokens(llama4_tokenizer):
    tok = llama4_tokenizer
    assert tok.eos_token == EOT and tok.eos_token_id == EOT_ID
    assert ensure_distinct_pad(tok) == PAD
    assert tok.pad_token == PAD and tok.pad_token_id == PAD_ID
    assert tok.pad_token_id != tok.eos_token_id


def test_ensure_distinct_pad_on_llama4_padding_with_eos(llama4_tokenizer):
    tok = llama4_tokenizer
    original = tok.pad_token
    try:
        tok.pad_token = tok.eos_token
        assert tok.pad_token_id == EOT_ID
        assert ensure_distinct_pad(tok) == PAD
        assert tok.pad_token_id == PAD_ID
    finally:
        tok.pad_token = original
    assert tok.pad_token_id == PAD_ID


def test_train_example_ends_with_eot_token(llama4_tokenizer, real_rows):
    tok = llama4_tokenizer
    for r in (real_rows[0], real_rows[10], real_rows[603]):
        ex = D.train_example(r, tok.eos_token)
        assert set(ex) == {"prompt", "completion"}
        assert ex["completion"].endswith(EOT)
        assert ex["completion"].count(EOT) == 1
        assert ex["completion"].startswith("<think>\n" + r["Complex_CoT"].strip() + "\n</think>\n")
        assert ex["completion"] == f"<think>\n{r['Complex_CoT'].strip()}\n</think>\n{r['Response'].strip()}{EOT}"
        ids = tok(ex["prompt"] + ex["completion"])["input_ids"]
        assert ids[-1] == EOT_ID
        assert ids.count(EOT_ID) == 1  # EOS is a single special token, not split into text pieces
        prompt_ids = tok(ex["prompt"])["input_ids"]
        assert ids[:len(prompt_ids)] == prompt_ids  # the prompt's tokens are a prefix of the full text's


def test_test_prompt_shape(real_rows):
    q = real_rows[10]["Question"]
    prompt = D.test_prompt(q)
    assert prompt.endswith("### Response:\n")
    assert "### Question:\n" + q.strip() + "\n\n### Response:\n" in prompt
    assert prompt.count("### Question:") == 1 and prompt.count("### Response:") == 1
    assert "<think>" in prompt and "</think>" in prompt  # the instruction tells the format
    assert D.test_prompt("  padded question \n") == D.test_prompt("padded question")


def test_training_text_starts_with_test_prompt(real_rows):
    for r in real_rows[:20]:
        ex = D.train_example(r, EOT)
        assert ex["prompt"] == D.test_prompt(r["Question"])
        full = ex["prompt"] + ex["completion"]
        assert full.startswith(D.test_prompt(r["Question"]))


def test_zh_template():
    q = "患者发热三天，最可能的诊断是什么？"
    zh = D.test_prompt(q, "zh")
    en = D.test_prompt(q, "en")
    assert "医学问题" in zh and "临床" in zh
    assert "### Question:\n" + q in zh
    assert zh.endswith("### Response:\n")
    assert "### Role:" in zh
    assert zh != en and "medical question" not in zh
    ex = D.train_example(row(q=q), EOT, language="zh")
    assert ex["prompt"] == zh and ex["completion"].endswith(EOT)


def test_unknown_language_is_data_error():
    with pytest.raises(D.DataError, match="'fr'"):
        D.test_prompt("q", "fr")
    with pytest.raises(D.DataError, match="'fr'"):
        D.train_example(row(), EOT, language="fr")


def test_train_example_needs_eos():
    for eos in ("", None):
        with pytest.raises(D.DataError, match="EOS"):
            D.train_example(row(), eos)


# ---------------------------------------------------------------------------------------------------------------
# ensure_distinct_pad on tiny tokenizers
# ---------------------------------------------------------------------------------------------------------------

def tiny_tokenizer(vocab: dict[str, int], eos: str, pad: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token=eos))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"pad_token": pad} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, **kwargs)


def test_ensure_distinct_pad_picks_a_candidate_when_pad_is_eos():
    tok = tiny_tokenizer({"<|im_end|>": 0, "<|endoftext|>": 1, "hello": 2}, "<|im_end|>", "<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id == 0
    assert ensure_distinct_pad(tok) == "<|endoftext|>"
    assert tok.pad_token_id == 1 and tok.eos_token_id == 0


def test_ensure_distinct_pad_when_no_pad():
    tok = tiny_tokenizer({"</s>": 0, "<pad>": 1}, "</s>", None)
    assert tok.pad_token is None
    assert ensure_distinct_pad(tok) == "<pad>"
    assert tok.pad_token_id == 1


def test_ensure_distinct_pad_prefers_the_llama4_pad_in_order():
    tok = tiny_tokenizer({"</s>": 0, "<|endoftext|>": 1, "<|finetune_right_pad|>": 2}, "</s>", "</s>")
    assert ensure_distinct_pad(tok) == "<|finetune_right_pad|>"


def test_ensure_distinct_pad_without_candidate_raises():
    tok = tiny_tokenizer({"</s>": 0}, "</s>", "</s>")
    with pytest.raises(ValueError) as err:
        ensure_distinct_pad(tok)
    assert "'</s>'" in str(err.value) and "pad token" in str(err.value)
    assert tok.pad_token == "</s>"  # left unchanged


def test_ensure_distinct_pad_keeps_an_existing_distinct_pad():
    tok = tiny_tokenizer({"</s>": 0, "<|endoftext|>": 1, "<mine>": 2}, "</s>", "<mine>")
    assert ensure_distinct_pad(tok) == "<mine>"
    assert tok.pad_token_id == 2


# ---------------------------------------------------------------------------------------------------------------
# Bad input files
# ---------------------------------------------------------------------------------------------------------------

def test_non_json_line_names_line(tmp_path):
    path = write_lines(tmp_path, [json.dumps(row()), json.dumps(row()), "{not json", json.dumps(row())])
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))
    assert "line 3" in str(err.value) and str(path) in str(err.value)


def test_missing_field_names_row_and_field(tmp_path):
    bad = row()
    del bad["Response"]
    path = write_lines(tmp_path, [json.dumps(row()), json.dumps(bad), json.dumps(row())])
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))
    msg = str(err.value)
    assert "line 2" in msg and "'Response'" in msg and "missing" in msg and str(path) in msg


@pytest.mark.parametrize("cot", ["", "   \n  "])
def test_empty_field(tmp_path, cot):
    path = write_lines(tmp_path, [json.dumps(row(cot=cot)), json.dumps(row())])
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))
    msg = str(err.value)
    assert "line 1" in msg and "'Complex_CoT'" in msg and "empty" in msg


def test_non_string_field(tmp_path):
    path = write_lines(tmp_path, [json.dumps(row()), json.dumps(row()), json.dumps(row(q=42))])
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))
    msg = str(err.value)
    assert "line 3" in msg and "'Question'" in msg and "int, not a string" in msg


def test_json_array_line(tmp_path):
    path = write_lines(tmp_path, [json.dumps(row()), json.dumps(["Question", "Complex_CoT", "Response"])])
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))
    msg = str(err.value)
    assert "line 2" in msg and "JSON object" in msg and "list" in msg


def test_fewer_than_two_rows(tmp_path):
    path = write_lines(tmp_path, [json.dumps(row())])
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))
    assert "1 usable rows" in str(err.value) and "at least 2" in str(err.value)


def test_blank_lines_and_extra_fields_are_ignored(tmp_path):
    extra = {**row(q="second"), "source": "x"}
    path = write_lines(tmp_path, [json.dumps(row()), "", "   ", json.dumps(extra)])
    rows = D.load_rows(str(path))
    assert rows == [row(), row(q="second")]


def test_write_jsonl_round_trip_unicode(tmp_path):
    rows = [row(q="发热？"), {"row": 3, **row()}]
    path = D.write_jsonl(rows, tmp_path / "sub" / "x.jsonl")
    assert D.read_jsonl(path) == rows
    assert "发热" in path.read_text(encoding="utf-8")  # written as UTF-8, not \\u escapes


# ---------------------------------------------------------------------------------------------------------------
# Notebook 03 in one call
# ---------------------------------------------------------------------------------------------------------------

def test_prepare_writes_split_to_run(tmp_path, llama4_tokenizer):
    cfg = C.load(PARAMS / "smoke.yaml")
    run = RunDir.create(cfg, root=tmp_path)
    info = D.prepare(cfg, run, llama4_tokenizer)

    train = D.read_jsonl(run.train_data_path)
    held = D.read_jsonl(run.heldout_path)
    assert info["rows"] == cfg.max_rows == 16
    assert info["heldout"] == len(held) == cfg.heldout_size
    assert info["train"] == len(train) == 16 - cfg.heldout_size
    assert info["heldout_rows"] == [r["row"] for r in held]
    assert info["heldout_rows"][:2] == [0, 10]
    assert not {r["row"] for r in train} & {r["row"] for r in held}
    assert sorted([r["row"] for r in train] + info["heldout_rows"]) == list(range(16))

    sample = D.load_rows(SAMPLE, max_rows=16)
    for t in train:
        assert set(t) == {"row", "prompt", "completion"}
        assert t["completion"].endswith(EOT)
        assert t == {"row": t["row"], **D.train_example(sample[t["row"]], EOT, cfg.language)}
    for h in held:  # held-out rows are saved raw, with their dataset index
        assert {k: h[k] for k in D.FIELDS} == sample[h["row"]]
    assert info["first_text"] == train[0]["prompt"] + train[0]["completion"]

    back_train, back_held = D.read_split(run)
    assert back_train == train and back_held == held


def test_read_split_before_prepare(tmp_path):
    run = RunDir.create(C.load(PARAMS / "smoke.yaml"), root=tmp_path)
    with pytest.raises(FileNotFoundError, match="notebook 03"):
        D.read_split(run)


# ---------------------------------------------------------------------------------------------------------------
# The dataset's own column names (columns)
# ---------------------------------------------------------------------------------------------------------------

LOWER = {"Question": "question", "Complex_CoT": "complex_cot", "Response": "response"}


def renamed(real_path: Path, tmp_path: Path, names: dict, name: str = "renamed.jsonl") -> Path:
    """The 604 real rows with their fields renamed (as several public copies of the dataset have them), in tmp."""
    lines = [json.loads(line) for line in real_path.read_text(encoding="utf-8").splitlines()]
    return write_lines(tmp_path, [json.dumps({names.get(k, k): v for k, v in r.items()}, ensure_ascii=False)
                                  for r in lines], name)


def test_lower_case_fields_get_one_message_naming_the_mapping(real_path, real_rows, tmp_path):
    """Before: three "field is missing" lines per row, and with bad_rows: skip "0 usable rows"."""
    path = renamed(real_path, tmp_path, LOWER)
    for policy in ("fail", "skip"):
        with pytest.raises(D.DataError) as err:
            D.load_rows(str(path), bad_rows=policy)
        assert str(err.value) == (
            f"{path}: the rows have no field 'Question', 'Complex_CoT', 'Response' but have 'question', 'complex_cot', "
            "'response': the same names in another case (604 of 604 rows, from line 1). Fields are read by their "
            "exact names; map them in the profile:\n"
            "  columns: {Question: question, Complex_CoT: complex_cot, Response: response}")
    assert D.load_rows(str(path), columns=LOWER) == real_rows  # the mapping reads exactly the original rows


def test_columns_map_other_names_and_name_them_in_row_messages(real_path, real_rows, tmp_path):
    factory = {"Question": "instruction", "Complex_CoT": "cot", "Response": "output"}  # LLaMA-Factory's alpaca names
    path = renamed(real_path, tmp_path, factory)
    with pytest.raises(D.DataError) as err:
        D.load_rows(str(path))
    assert str(err.value) == (
        f"{path}: no row has the field 'Question', 'Complex_CoT', 'Response' (line 1 has 'instruction', 'cot', "
        "'output'). If the dataset names it otherwise, map it in the profile: columns: {Question: <its column>, "
        "Complex_CoT: <its column>, Response: <its column>}; else give a dataset with Question, Complex_CoT, Response.")
    assert D.load_rows(str(path), columns=factory, max_rows=20) == real_rows[:20]
    bad = write_lines(tmp_path, [json.dumps({"instruction": "q1", "cot": "c", "output": "r"}),
                                 json.dumps({"instruction": "q2", "cot": "c"})], "bad.jsonl")
    with pytest.raises(D.DataError, match=r"line 2: field 'output' \(Response, by columns\) is missing"):
        D.load_rows(str(bad), columns=factory)


def test_columns_through_the_profile_and_notebook_03(real_path, tmp_path):
    path = renamed(real_path, tmp_path, LOWER)
    cfg = C.load(PARAMS / "smoke.yaml").replace(dataset=str(path), columns=LOWER)
    assert C.load(PARAMS / "smoke.yaml").columns == {}
    run = RunDir.create(cfg, root=tmp_path / "runs")

    class Tok:  # a stand-in without __call__: no length check
        eos_token = EOT

    info = D.prepare(cfg, run, Tok())
    assert info["rows"] == 16 and info["heldout_rows"][:2] == [0, 10]
    held = D.read_jsonl(run.heldout_path)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert {k: held[0][k] for k in D.FIELDS} == {f: first[c] for f, c in LOWER.items()}
    for bad, words in [({"question": "q"}, "'question' is none of them. Did you mean 'Question'?"),
                       ({"Question": 5}, "'columns.Question' must be the dataset's column name (text), got 5."),
                       ({"Question": "q", "Response": "q"}, "gives the column 'q' to two fields")]:
        with pytest.raises(C.ConfigError) as err:
            cfg.replace(columns=bad)
        assert words in str(err.value)
