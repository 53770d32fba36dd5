"""Multiple-choice medical benchmarks (MedQA, PubMedQA) before (04) and after (06) fine-tuning.

Sources (``RunConfig.benchmarks``: a mapping ``name -> source``, the source a string or
``{"source", "config", "split"}``):

- a local JSONL file or ``package:<pkg>/<file>.jsonl``;
- anything else is handed to :func:`datasets.load_dataset` (a Hub id such as ``GBaker/MedQA-USMLE-4-options``, or
  a local dataset folder), with the spec's ``config`` and ``split`` (default split "test").

Every row is normalized to one :class:`MCItem` whatever its layout (:func:`normalize_row` lists the layouts).

Two ways to score an item (``RunConfig.benchmark_mode``):

- ``"loglik"``: the prompt (:func:`mc_prompt`) followed by an answer prefix with an empty reasoning block,
  ``<think>\\n</think>\\nThe answer is``; each option's letter (``" A"``, ``" B"``, ...) is scored by the sum of its
  tokens' log-probabilities (nats) and the highest wins (ties: the first). The same idea as lm-evaluation-harness'
  multiple-choice tasks (its MedQA task scores the letters too). It measures the direct answer, without reasoning;
  one forward pass per item when each letter is one token. Nothing is unparseable in this mode.
- ``"generate"``: greedy generation with the test template (as in 04/06), then the letter is read from the text by
  :func:`extract_choice`; text with no readable letter counts as wrong and is reported as unparseable. This is how
  the HuatuoGPT-o1 paper evaluated, but a reasoning model needs a large ``max_new_tokens`` to reach its answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from medtune import data as _data

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PUBMEDQA_OPTIONS = ("yes", "no", "maybe")

# What follows the test prompt in "loglik" mode: an empty reasoning block in the training template's shape
# (medtune.data.completion_text), then an answer statement that the letter completes.
ANSWER_PREFIX = {"en": "<think>\n</think>\nThe answer is", "zh": "<think>\n</think>\n答案是"}
_LETTER_CONTINUATION = {"en": " {letter}", "zh": "{letter}"}
_TEXT_CONTINUATION = {"en": " {text}", "zh": "{text}"}
_WORDING = {
    "en": {"context": "Context:", "question": "Question:", "options": "Options:",
           "ask": "Answer with the letter of the correct option."},
    "zh": {"context": "背景：", "question": "问题：", "options": "选项：", "ask": "请用正确选项的字母作答。"},
}

# Anchor from the paper that built medical-o1-reasoning-SFT: accuracy in percent, Llama-3.1-8B-Instruct before and
# after SFT on the dataset (no RL). Source: Chen et al. 2024, "HuatuoGPT-o1, Towards Medical Complex Reasoning with
# LLMs", arXiv:2412.18925; figures as recorded in shared/notes/FIELD-NOTES.md. Context, not a target.
PAPER_ANCHOR = {
    "source": "HuatuoGPT-o1 paper (Chen et al. 2024, arXiv:2412.18925)",
    "model": "Llama-3.1-8B-Instruct",
    "note": ("a different, larger model (8B parameters), fine-tuned on the whole dataset and evaluated on the full "
             "test sets by generating answers; context for a run's figures, not a target"),
    "unit": "accuracy, percent",
    "medqa": {"before_sft": 58.7, "after_sft": 69.0},
    "pubmedqa": {"before_sft": 75.2, "after_sft": 77.7},
}


class BenchmarkError(ValueError):
    """A benchmark source cannot be used; the message names the source, the row (1-based) and the fix."""


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One multiple-choice item, whatever the layout it was read from.

    Attributes:
        id: the item's id in its source (``problem_id``, ``id``, ``pubid``...), or its 0-based index as text.
        question: the question (for MedQA the whole vignette).
        options: the option texts in letter order (MedQA: 4; PubMedQA: ``("yes", "no", "maybe")``).
        answer: the correct option's letter, upper case ("A" is ``options[0]``).
        context: PubMedQA's abstract (paragraphs joined by newlines); ``None`` for MedQA.
    """

    id: str
    question: str
    options: tuple[str, ...]
    answer: str
    context: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def _letter(value, n: int, where: str) -> str:
    """A gold answer given as a letter ("b", "B", ["b"]) -> "B"; checked against the number of options."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if not (isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:n]):
        raise BenchmarkError(f"{where}: answer {value!r} is not one of the letters {LETTERS[:n]} of its {n} options.")
    return value.strip().upper()


def _text_answer(value, options: Sequence[str], where: str) -> str:
    """A gold answer given as option text ("yes", ["Aspirin"]) -> its letter."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    lowered = [o.strip().lower() for o in options]
    if not isinstance(value, str) or value.strip().lower() not in lowered:
        raise BenchmarkError(f"{where}: answer {value!r} is not the text of one of its options {list(options)}.")
    return LETTERS[lowered.index(value.strip().lower())]


def _join_context(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):  # qiaojin/PubMedQA: {"contexts": [...], "labels": [...], "meshes": [...]}
        value = value.get("contexts")
    if isinstance(value, (list, tuple)):
        value = "\n".join(str(v).strip() for v in value if str(v).strip())
    if not isinstance(value, str):
        raise BenchmarkError(f"context of type {type(value).__name__}: expected text or a list of paragraphs.")
    return value.strip() or None


def normalize_row(row: dict, index: int = 0, source: str = "<rows>") -> MCItem:
    """One row of any supported layout -> :class:`MCItem`.

    Layouts, recognised by their fields:

    - medLLM_QA_benchmark files (``../shared/data/benchmarks/*.jsonl``): ``problem_text``, ``choices`` (list),
      ``answer`` (``["b"]``), PubMedQA adds ``context`` (text).
    - GBaker/MedQA-USMLE-4-options and bigbio/med_qa (source schema): ``question``, ``options`` as a dict
      ``{"A": text, ...}`` or a list of ``{"key": "A", "value": text}``, ``answer_idx`` ("C").
    - qiaojin/PubMedQA (``pqa_labeled``): ``question``, ``context: {"contexts": [...]}``, ``final_decision``
      (yes/no/maybe); bigbio/pubmed_qa source schema: ``QUESTION``, ``CONTEXTS``, ``final_decision``. Options are
      always ``yes, no, maybe`` (letters A, B, C).
    - BigBio QA schema (bigbio/med_qa ``*_bigbio_qa``, bigbio/pubmed_qa ``*_bigbio_qa``): ``question``,
      ``choices`` (list of texts), ``answer`` (list holding the correct text), optional ``context``.

    Args:
        row: the parsed row.
        index: its 0-based position (used as id when the row has none, and in messages as ``index + 1``).
        source: where it came from, for messages.

    Raises:
        BenchmarkError: unknown layout (names the fields seen), empty question, fewer than 2 options, or an
            answer that is not one of the options.
    """
    where = f"{source} row {index + 1}"
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    context = None
    if "problem_text" in row and "choices" in row:
        question, options = row["problem_text"], list(row["choices"])
        answer = _letter(row.get("answer"), len(options), where)
        context = _join_context(row.get("context"))
        item_id = row.get("problem_id", index)
    elif "options" in row and "answer_idx" in row:
        opts = row["options"]
        if isinstance(opts, dict):
            keys = sorted(k for k in opts if opts[k] is not None)
            options = [opts[k] for k in keys]
        elif isinstance(opts, list) and all(isinstance(o, dict) and "key" in o and "value" in o for o in opts):
            keys = [o["key"] for o in sorted(opts, key=lambda o: o["key"])]
            options = [o["value"] for o in sorted(opts, key=lambda o: o["key"])]
        else:
            raise BenchmarkError(f"{where}: 'options' must be {{'A': text, ...}} or [{{'key', 'value'}}, ...].")
        if [k.upper() for k in keys] != list(LETTERS[:len(keys)]):
            raise BenchmarkError(f"{where}: option keys {keys} are not the letters A, B, C... in order.")
        question = row.get("question")
        answer = _letter(row["answer_idx"], len(options), where)
        item_id = row.get("id", index)
    elif "final_decision" in row:
        question = row.get("question", row.get("QUESTION"))
        options = list(PUBMEDQA_OPTIONS)
        answer = _text_answer(row["final_decision"], options, where)
        context = _join_context(row.get("context", row.get("CONTEXTS")))
        item_id = row.get("pubid", row.get("PUBMED_ID", row.get("pubmed_id", index)))
    elif "question" in row and "choices" in row and "answer" in row:
        question, options = row["question"], list(row["choices"])
        answer = _text_answer(row["answer"], options, where)
        context = _join_context(row.get("context"))
        item_id = row.get("id", row.get("question_id", index))
    else:
        raise BenchmarkError(
            f"{where}: unknown layout (fields: {', '.join(sorted(row))}). Supported: problem_text+choices+answer; "
            "question+options+answer_idx (GBaker/MedQA, bigbio/med_qa); question+context+final_decision "
            "(qiaojin/PubMedQA); question+choices+answer (BigBio QA schema)."
        )
    if not isinstance(question, str) or not question.strip():
        raise BenchmarkError(f"{where}: the question is missing or empty.")
    if len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        raise BenchmarkError(f"{where}: needs at least 2 non-empty options, got {options!r}.")
    return MCItem(id=str(item_id), question=question.strip(), options=tuple(o.strip() for o in options),
                  answer=answer, context=context)


def spec_of(value) -> dict:
    """A ``benchmarks`` entry (a source string or ``{"source", "config", "split"}``) -> the full dict.

    Raises:
        BenchmarkError: not a string or a dict with a ``source`` and only those three keys.
    """
    if isinstance(value, str) and value.strip():
        return {"source": value, "config": None, "split": None}
    if isinstance(value, dict) and isinstance(value.get("source"), str) and set(value) <= {"source", "config", "split"}:
        return {"source": value["source"], "config": value.get("config"), "split": value.get("split")}
    raise BenchmarkError(
        f"benchmark spec {value!r}: give a source (local JSONL, package:<pkg>/<file>, or Hub id) or "
        "{source: ..., config: ..., split: ...}."
    )


def read_benchmark(source: str, config: str | None = None, split: str | None = None,
                   limit: int | None = None) -> list[MCItem]:
    """Read a benchmark and normalize every row (:func:`normalize_row`).

    Args:
        source: a local JSONL path, ``package:<pkg>/<file>.jsonl``, or a :func:`datasets.load_dataset` source (a Hub
            id like ``GBaker/MedQA-USMLE-4-options``, or a local dataset folder).
        config: the dataset config (``qiaojin/PubMedQA`` needs ``pqa_labeled``); ignored for JSONL files.
        split: the split (default "test"; ``qiaojin/PubMedQA`` has only "train"); ignored for JSONL files.
        limit: keep the first ``limit`` items, in source order (``None``: all).

    Returns:
        The items, in source order.

    Raises:
        BenchmarkError: a missing file, an unreadable line, or a bad row (names the row).
    """
    if source.startswith("package:"):
        path = _data._package_path(source)
    else:
        path = Path(source)
    if source.startswith("package:") or path.suffix in (".jsonl", ".json") or path.is_file():
        if not path.is_file():
            raise BenchmarkError(f"benchmark file not found: {path}. Give an existing JSONL file or a Hub dataset id.")
        try:
            rows = _data.read_jsonl(path)
        except _data.DataError as err:
            raise BenchmarkError(str(err)) from err
        name = str(path)
    else:
        import datasets

        ds = datasets.load_dataset(source, config, split=split or "test")
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        rows, name = ds.to_list(), source
    if limit is not None:
        rows = rows[:limit]
    return [normalize_row(r, i, name) for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------------------------------------------
# Prompts and reading the letter
# ----------------------------------------------------------------------------------------------------------------

def mc_question(item: MCItem, language: str = "en") -> str:
    """The text put under ``### Question:`` of the test template: context (PubMedQA), question, lettered options,
    and a request for the letter::

        Context:
        <abstract>

        Question:
        <question>

        Options:
        A. yes
        B. no
        C. maybe

        Answer with the letter of the correct option.

    Without a context the ``Context``/``Question`` headers are left out (MedQA: vignette, then options).
    """
    w = _WORDING[language]
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(item.options))
    body = item.question if item.context is None else f"{w['context']}\n{item.context}\n\n{w['question']}\n{item.question}"
    return f"{body}\n\n{w['options']}\n{opts}\n\n{w['ask']}"


def mc_prompt(item: MCItem, language: str = "en") -> str:
    """The full test prompt for an item: :func:`medtune.data.test_prompt` around :func:`mc_question`."""
    return _data.test_prompt(mc_question(item, language), language)


_FILL = r"[\s*_`\"'(\[{]*"
# Answer statements (English and Chinese). The letter or option text must follow right after (see extract_choice).
_STATEMENT = re.compile(
    r"(?:\b(?:(?:final|correct|right|best)\s+)?answer\b|\b(?:correct|right|best)\s+(?:option|choice)\b)"
    r"(?:\s*(?:is|would\s+be|will\s+be|should\s+be)\b)?\s*[:=：]?" + _FILL + r"(?:(?:option|choice)\b" + _FILL + r")?"
    r"|(?:(?:正确|最终)?答案|正确选项)\s*(?:应该?)?(?:是|为)?\s*[:：]?" + _FILL
    + r"|(?:故|应|应该|所以|因此)选\s*" + _FILL,
    re.IGNORECASE,
)
# After a statement's letter: another option letter joined by "or", "and", ",", "/" -> the statement is ambiguous.
_AMBIGUOUS_AFTER = re.compile(r"\s*[)\]*]*\s*(?:,|/|&|\bor\b|\band\b|或|和)\s*[(\[*]*[A-Z](?![A-Za-z0-9])")


def _statement_choice(rest: str, options: Sequence[str]) -> str | None | bool:
    """What follows an answer statement: a letter, an option's text, ``False`` (ambiguous), or ``None`` (neither)."""
    n = len(options)
    if re.match(r"[A-Za-z](?![A-Za-z0-9])", rest):
        letter = rest[0]
        lower_word = letter.islower() and re.match(r"\s+[A-Za-z]", rest[1:])  # "the answer is a beta blocker"
        if letter.upper() in LETTERS[:n] and not lower_word:
            if _AMBIGUOUS_AFTER.match(rest[1:]):
                return False
            return letter.upper()
    low = rest.lower()
    hits = [i for i, o in enumerate(options)
            if low.startswith(o.lower()) and not low[len(o):len(o) + 1].isalnum()]
    if hits:
        return LETTERS[max(hits, key=lambda i: len(options[i]))]
    return None


def answer_part(text: str) -> str:
    """The answer of a generation: the text after the last ``</think>``; without one, the whole text (a leading
    ``<think>`` removed). Stripped of surrounding whitespace."""
    if _data.THINK_CLOSE in text:
        return text.rsplit(_data.THINK_CLOSE, 1)[1].strip()
    return text.strip().removeprefix(_data.THINK_OPEN).strip()


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text answer gives, or ``None`` when it cannot be read (counted as wrong).

    The rule, applied to :func:`answer_part` of ``text`` (the text after ``</think>`` when there is one):

    1. Answer statements: "answer is X", "answer: X", "final/correct/best answer X", "correct option is X",
       "答案是X", "答案：X", "正确答案为X"..., with optional ``*``, ``(``, quotes or "option" between the statement and
       ``X``. ``X`` is a letter of the item's options (either case; a lower-case letter followed by a word, as in
       "the answer is a beta blocker", is not a letter) or the text of an option ("the answer is yes"). The LAST
       statement wins, so an explanation after it that names other letters does not change it. If that statement
       names several letters ("the answer is B or C"), the answer is ``None``.
    2. Otherwise, a lone letter at the very start: "C", "C.", "(C)", "**C**", "c)" followed by punctuation or the
       end of the line.
    3. Otherwise ``None``: text that only mentions letters ("A is wrong, B might be right, C...") without a
       statement is unparseable, even if it names a single letter.

    Args:
        text: the generated text (special tokens already removed).
        options: the item's option texts, in letter order (their number bounds the letters).

    Returns:
        An upper-case letter among the first ``len(options)``, or ``None``.
    """
    region = answer_part(text)
    last = None  # the last statement's reading: a letter, or False when it names several letters
    for m in _STATEMENT.finditer(region):
        got = _statement_choice(region[m.end():], options)
        if got is not None:
            last = got
    if last is not None:
        return last or None
    m = re.match(r"[\s*_(\[]*([A-Za-z])(?:[.)\]:*]|[ \t]*(?:\n|$))", region)
    if m and m.group(1).upper() in LETTERS[:len(options)]:
        return m.group(1).upper()
    return None


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------

def _device(model) -> torch.device:
    return next(p for p in model.parameters()).device


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 4) -> list[float]:
    """Sum of log-probabilities (natural log, nats) of each continuation given its prompt.

    ``prompt`` is tokenized alone and ``prompt + continuation`` together; the continuation's tokens are those
    from where the two sequences diverge (as :func:`medtune.evaluate.response_loss` and TRL do), so a continuation
    that merges with the prompt's last token is still scored correctly. Sequences that need the same forward pass
    (same context, one continuation token: the usual case for option letters) are computed once.

    Args:
        model: a causal LM (4-bit, optionally with a PEFT adapter).
        tokenizer: its tokenizer (a pad token set).
        pairs: ``(prompt, continuation)`` strings.
        batch_size: sequences per forward pass (right-padded).

    Returns:
        One float per pair: ``sum_t log p(token_t | tokens before it)`` over the continuation's tokens (<= 0).

    Raises:
        ValueError: a continuation adds no token.
    """
    model.eval()
    device = _device(model)
    targets: list[tuple[tuple[int, ...], int, list[int]]] = []  # (forward sequence, first scored position, tokens)
    for prompt, cont in pairs:
        p_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + cont)["input_ids"]
        start = next((i for i, (a, b) in enumerate(zip(p_ids, full)) if a != b), min(len(p_ids), len(full)))
        if start >= len(full):
            raise ValueError(f"continuation {cont!r} adds no token to its prompt.")
        start = max(start, 1)  # the first token of a sequence has no prediction
        targets.append((tuple(full[:-1]), start, full[start:]))
    unique = list(dict.fromkeys(t[0] for t in targets))
    logprobs: dict[tuple[int, ...], tuple[int, torch.Tensor]] = {}  # sequence -> (first position, log-probs)
    from medtune.evaluate import _progress

    batches = [unique[i:i + batch_size] for i in range(0, len(unique), batch_size)]
    needed: dict[tuple[int, ...], int] = {}
    for seq, start, _ in targets:  # earliest scored position per sequence: only those logits are kept
        needed[seq] = min(needed.get(seq, len(seq)), start - 1)
    for batch in _progress(batches, len(batches), "option log-likelihood"):
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        # Only the columns from the earliest scored position on are projected to the vocabulary (202k for Llama 4).
        keep = width - min(needed[s] for s in batch)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits
        offset = width - logits.shape[1]
        for i, s in enumerate(batch):
            first = needed[s]
            logprobs[s] = (first, torch.log_softmax(logits[i, first - offset:len(s) - offset].float(), dim=-1).cpu())
    out = []
    for seq, start, tokens in targets:
        first, lp = logprobs[seq]
        out.append(sum(float(lp[start - 1 + k - first, t]) for k, t in enumerate(tokens)))
    return out


def predict_loglik(model, tokenizer, items: Sequence[MCItem], *, language: str = "en", target: str = "letter",
                   batch_size: int = 4) -> list[dict]:
    """Pick each item's option with the highest log-likelihood after ``mc_prompt + ANSWER_PREFIX``.

    Args:
        target: ``"letter"`` scores ``" A"``, ``" B"``... (every option one token for the usual tokenizers, so no
            length bias); ``"text"`` scores each option's text (a sum over its tokens, which favours short options).
        batch_size: sequences per forward pass.

    Returns:
        One dict per item: ``{"id", "answer", "predicted", "correct", "parsed": True, "scores": [nats per option]}``;
        ties go to the first option.
    """
    if target not in ("letter", "text"):
        raise ValueError(f"target must be 'letter' or 'text', got {target!r}.")
    template = _LETTER_CONTINUATION[language] if target == "letter" else _TEXT_CONTINUATION[language]
    pairs, spans = [], []
    for item in items:
        prompt = mc_prompt(item, language) + ANSWER_PREFIX[language]
        start = len(pairs)
        pairs += [(prompt, template.format(letter=LETTERS[i], text=o)) for i, o in enumerate(item.options)]
        spans.append((start, len(pairs)))
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    out = []
    for item, (a, b) in zip(items, spans):
        s = scores[a:b]
        pred = LETTERS[max(range(len(s)), key=lambda i: (s[i], -i))]
        out.append({"id": item.id, "answer": item.answer, "predicted": pred, "correct": pred == item.answer,
                    "parsed": True, "scores": [round(x, 4) for x in s]})
    return out


def predict_generate(model, tokenizer, items: Sequence[MCItem], *, language: str = "en", max_new_tokens: int = 1200,
                     batch_size: int = 4) -> list[dict]:
    """Generate a greedy answer to each item with the test template and read its letter (:func:`extract_choice`).

    Returns:
        One dict per item: ``{"id", "answer", "predicted" (letter or None), "correct", "parsed", "output",
        "new_tokens", "stopped"}``; unparseable outputs have ``parsed`` False and count as wrong.
    """
    from medtune.evaluate import generate_answers

    rows = [{"row": item.id, "Question": mc_question(item, language)} for item in items]
    gens = generate_answers(model, tokenizer, rows, language=language, max_new_tokens=max_new_tokens,
                            batch_size=batch_size)
    out = []
    for item, g in zip(items, gens):
        pred = extract_choice(g["answer"], item.options)
        out.append({"id": item.id, "answer": item.answer, "predicted": pred, "correct": pred == item.answer,
                    "parsed": pred is not None, "output": g["answer"], "new_tokens": g["new_tokens"],
                    "stopped": g["stopped"]})
    return out


def summarize(predictions: Sequence[dict], items: Sequence[MCItem]) -> dict:
    """Accuracy and parse failures over one benchmark's predictions.

    Returns:
        ``{"items", "correct", "accuracy" (correct / items; unparseable count as wrong), "unparsed",
        "unparsed_share", "chance" (mean of 1 / options: the accuracy of guessing), "predicted_counts"
        ({letter or "unparsed": count})}``. Shares are fractions in [0, 1] rounded to 4 places; ``None`` when empty.
    """
    n = len(predictions)
    correct = sum(bool(p["correct"]) for p in predictions)
    unparsed = sum(not p["parsed"] for p in predictions)
    counts = Counter(p["predicted"] or "unparsed" for p in predictions)
    return {
        "items": n,
        "correct": correct,
        "accuracy": round(correct / n, 4) if n else None,
        "unparsed": unparsed,
        "unparsed_share": round(unparsed / n, 4) if n else None,
        "chance": round(sum(1 / len(i.options) for i in items) / n, 4) if n else None,
        "predicted_counts": dict(sorted(counts.items())),
    }


# ----------------------------------------------------------------------------------------------------------------
# One call per notebook cell (04 and 06)
# ----------------------------------------------------------------------------------------------------------------

def predictions_path(run, stage: str, name: str) -> Path:
    """``<run>/benchmarks/<stage>-<name>.jsonl``: one line per item with the prediction."""
    return run.path / "benchmarks" / f"{stage}-{name}.jsonl"


def measure(cfg, run, model, tokenizer, stage: str) -> dict:
    """Score every benchmark of ``cfg.benchmarks`` (first ``cfg.benchmark_limit`` items, ``cfg.benchmark_mode``).

    Per-item predictions go to :func:`predictions_path`. Generation uses ``cfg.max_new_tokens`` and
    ``cfg.generation_batch_size``; log-likelihood uses ``cfg.eval_batch_size``.

    Args:
        stage: "baseline" (04) or "finetuned" (06); names the prediction files.

    Returns:
        ``{name: summarize(...) | {"source", "mode"}}``; ``{}`` when the profile lists no benchmarks.

    Raises:
        BenchmarkError: a source cannot be read (names it and the row).
    """
    results = {}
    if not cfg.benchmarks:
        print("no benchmarks in this profile (the 'benchmarks' key is empty): nothing to score.")
    for name, value in cfg.benchmarks.items():
        spec = spec_of(value)
        items = read_benchmark(spec["source"], spec["config"], spec["split"], cfg.benchmark_limit)
        print(f"{name}: {len(items)} items from {spec['source']}, mode {cfg.benchmark_mode}", flush=True)
        if cfg.benchmark_mode == "loglik":
            preds = predict_loglik(model, tokenizer, items, language=cfg.language, batch_size=cfg.eval_batch_size)
        else:
            preds = predict_generate(model, tokenizer, items, language=cfg.language,
                                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size)
        _data.write_jsonl(preds, predictions_path(run, stage, name))
        results[name] = {"source": spec["source"], "mode": cfg.benchmark_mode, **summarize(preds, items)}
    return results


def show(results: dict) -> str:
    """Markdown table of :func:`measure`'s results for one stage."""
    if not results:
        return "_No benchmarks in this profile._"
    lines = ["| benchmark | mode | items | correct | accuracy | chance | unparseable (share) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['mode']} | {r['items']} | {r['correct']} | {r['accuracy']} | {r['chance']} | "
                     f"{r['unparsed']} ({r['unparsed_share']}) |")
    return "\n".join(lines)


def _pct(value) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) and not math.isnan(value) else "not measured"


def anchor_table(run) -> str:
    """Markdown: this run's MedQA/PubMedQA accuracy (baseline, fine-tuned) beside :data:`PAPER_ANCHOR`.

    Only benchmarks named exactly ``medqa`` and ``pubmedqa`` in the profile are matched to the paper's rows;
    illustrative samples (the default profile) show "not measured".
    """
    m = run.metrics()
    b = m.get("baseline", {}).get("benchmarks", {})
    f = m.get("finetuned", {}).get("benchmarks", {})
    a = PAPER_ANCHOR
    lines = [
        f"**Context, not a target.** The paper's figures are for {a['model']} ({a['source']}): {a['note']}. "
        f"This run's figures are for {run.config().model}, on the items and with the mode in the table above. "
        "Accuracy in percent.",
        "",
        f"| benchmark | this run: baseline | this run: fine-tuned | {a['model']} before SFT (paper) | "
        f"{a['model']} after SFT (paper) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("medqa", "MedQA (USMLE, 4 options)"), ("pubmedqa", "PubMedQA (yes/no/maybe)")):
        lines.append(f"| {label} | {_pct(b.get(name, {}).get('accuracy'))} | {_pct(f.get(name, {}).get('accuracy'))} | "
                     f"{a[name]['before_sft']} | {a[name]['after_sft']} |")
    return "\n".join(lines)


def load_predictions(path: str | Path) -> list[dict]:
    """Read a predictions JSONL written by :func:`measure`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
