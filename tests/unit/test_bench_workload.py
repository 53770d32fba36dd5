"""The benchmark's real-row workload (medtune.bench.training), on the CPU: best-fit-decreasing packing as TRL packs,
padding-free batches as TRL's collator builds them, the lengths file, and the minutes figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medtune.bench import training as T

SHARED = Path(__file__).resolve().parents[3] / "shared"


def test_pack_bfd_puts_each_row_in_the_fullest_pack_it_fits():
    # sorted: 700, 600, 500, 400, 300, 100. 700 -> A (room 300); 600 -> B (400); 500 -> C (500);
    # 400 -> B (room 400, fullest that fits: 0 left); 300 -> A (0 left); 100 -> C (400 left)
    assert T.pack_bfd([300, 700, 100, 500, 400, 600], 1000) == [[700, 300], [600, 400], [500, 100]]
    assert T.pack_bfd([1200, 50], 1000) == [[1200], [50]]  # too long: a pack of its own


def test_pack_bfd_agrees_with_trl_on_the_same_rows():
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    lengths = [300, 700, 100, 500, 400, 600, 250, 90]
    ds = Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    trl_packs = sorted(sorted(p, reverse=True) for p in pack_dataset(ds, 1000, strategy="bfd")["seq_lengths"])
    assert trl_packs == sorted(sorted(p, reverse=True) for p in T.pack_bfd(lengths, 1000))


def test_rows_batch_restarts_positions_and_ignores_each_rows_first_label():
    gen = torch.Generator().manual_seed(0)
    b = T.rows_batch([3, 2], gen, device="cpu")
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]] and b["use_cache"] is False
    assert (b["labels"][0, [0, 3]] == -100).all() and (b["labels"][0, [1, 2, 4]] == b["input_ids"][0, [1, 2, 4]]).all()
    assert "attention_mask" not in b
    one = T.rows_batch([4], gen, device="cpu")
    assert set(one) == {"input_ids", "labels", "use_cache"} and torch.equal(one["labels"], one["input_ids"])


def test_lengths_file_round_trip_and_errors(tmp_path):
    path = T.write_lengths(tmp_path / "l.json", [5, 7], "test")
    assert T.read_lengths(path) == [5, 7] and json.loads(path.read_text())["source"] == "test"
    for text in ('{"lengths": [3, 0]}', '{"lengths": [1, true]}', "", "not json", '{"lengths": []}'):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=r"bad\.json.*--write-lengths FILE --rows-file"):
            T.read_lengths(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"missing\.json: cannot read"):
        T.read_lengths(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no lengths"):
        T.write_lengths(tmp_path / "empty.json", [], "test")
    assert not (tmp_path / "empty.json").exists()


def test_row_lengths_of_the_real_rows_with_the_real_tokenizer():
    from transformers import AutoTokenizer

    from medtune.stages import data

    rows_file = SHARED / "data" / "medical-o1" / "medical_o1_sft_en_604.jsonl"
    lengths = T.row_lengths(rows_file, SHARED / "tokenizers" / "llama4")
    assert len(lengths) == 604 and min(lengths) == 403 and max(lengths) == 1251
    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "llama4"))
    row = data.read_jsonl(rows_file)[0]
    ex = data.train_example(row, tok.eos_token)
    assert lengths[0] == len(tok(text=ex["prompt"] + ex["completion"])["input_ids"])


def test_training_minutes():
    assert T.training_minutes([600, 800], rows=480, tokens_per_s=1000) == pytest.approx(480 * 700 / 1000 / 60)


def test_row_lengths_names_the_row_without_the_fields(tmp_path):
    from medtune.stages.data import DataError

    f = tmp_path / "rows.jsonl"
    f.write_text('{"Question": "q", "Complex_CoT": "c", "Response": "r"}\n{"Question": "q"}\n')
    with pytest.raises(DataError, match=r"(?s)rows\.jsonl.*line 2.*Complex_CoT"):
        T.row_lengths(f, SHARED / "tokenizers" / "llama4")
    f.write_text('{"Question": null, "Complex_CoT": "c", "Response": "r"}\n')
    with pytest.raises(DataError, match=r"(?s)line 1.*Question"):
        T.row_lengths(f, SHARED / "tokenizers" / "llama4")
    f.write_text("")
    with pytest.raises(DataError, match="no rows"):
        T.row_lengths(f, SHARED / "tokenizers" / "llama4")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        T.row_lengths(f, tmp_path)


@pytest.mark.parametrize(("flags", "message"), [
    (["--gen-new", "1"], "--gen-new must be >= 2 (got 1)"),
    (["--gen-baseline-new", "0"], "--gen-baseline-new must be >= 2 (got 0)"),
    (["--gen-batches", "1", "0"], "--gen-batches must be batch sizes >= 1 (got 0)"),
    (["--gen-compiled-batches", "-1"], "--gen-compiled-batches must be batch sizes >= 1 (got -1)"),
    (["--gen-lora-batches", "0"], "--gen-lora-batches must be batch sizes >= 1 (got 0)"),
    (["--ll-batches", "0"], "--ll-batches must be batch sizes >= 1 (got 0)"),
    (["--gen-prompt", "8000"], "--gen-prompt + --gen-new must fit Scout's attention chunk of 8192 tokens"),
])
def test_generation_flags_that_would_fail_mid_benchmark_are_refused_before_any_gpu_work(flags, message, capsys):
    """A zero in --gen-compiled-batches or --gen-lora-batches failed only after every row before it (minutes of a
    rented GPU, and no generate.md), --gen-new 1 divided by zero after the model was built: the parser refuses them
    first, on a machine without a GPU too."""
    from medtune.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--generate", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
