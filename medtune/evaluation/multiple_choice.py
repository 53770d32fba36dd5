"""Multiple-choice medical benchmarks (MedQA, PubMedQA) before (04) and after (06) fine-tuning.

Sources (``RunConfig.benchmarks``: a mapping ``name -> source``, the source a string or
``{"source", "config", "split", "language"}``; ``language`` "en" or "zh" scores that benchmark with its own prompt
wording and answer cues, whatever the run's ``language``):

- a local JSONL file or ``package:<pkg>/<file>.jsonl``;
- a Hub id ``owner/name`` such as ``GBaker/MedQA-USMLE-4-options``, or a local dataset folder: handed to
  :func:`datasets.load_dataset` with the spec's ``config`` and ``split`` (default split "test");
- anything else is an error at once, naming the path it looked for.

:func:`validate` checks a profile's benchmark files whole, without a model or network (for the preflight in 00).

Every row is normalized to one :class:`MCItem` whatever its layout (:func:`normalize_row` lists the layouts).

Two ways to score an item (``RunConfig.benchmark_mode``):

- ``"loglik"``: the prompt (:func:`mc_prompt`) followed by an answer prefix with an empty reasoning block,
  ``<think>\\n</think>\\nThe answer is``; each option's letter (``" A"``, ``" B"``, ...) is scored by the sum of its
  tokens' log-probabilities (nats) and the highest wins (ties: the first). The same idea as lm-evaluation-harness'
  multiple-choice tasks (its MedQA task scores the letters too). It measures the direct answer, without reasoning;
  one forward pass per item when each letter is one token. Nothing is unparseable in this mode.
- ``"generate"``: greedy generation with the test template (as in 04/06), then the letter is read from the text by
  :func:`extract_choice` (an answer statement, or a lone letter; never a letter of an echo of the option list);
  text with no readable letter counts as wrong and is reported as unparseable. This is how
  the HuatuoGPT-o1 paper evaluated, but a reasoning model needs a large ``max_new_tokens`` to reach its answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from medtune.evaluation.heldout import answer_part, resolve_batch_size  # answer_part: also multiple_choice.answer_part
from medtune.io import sources as _sources
from medtune.stages import data as _data

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PUBMEDQA_OPTIONS = ("yes", "no", "maybe")
_LISTED = 20  # bad rows of one source spelled out by validate()

# What follows the test prompt in "loglik" mode: an empty reasoning block in the training template's shape
# (medtune.stages.data.completion_text), then an answer statement that the letter completes.
ANSWER_PREFIX = {"en": "<think>\n</think>\nThe answer is", "zh": "<think>\n</think>\n答案是"}
LETTER_CONTINUATION = {"en": " {letter}", "zh": "{letter}"}
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
    """A benchmark source cannot be used; the message names the source, the line (or row, 1-based) and the fix."""


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


def _kind(value) -> str:
    """A value's JSON kind for messages: ``null``, or its type and the start of its text (``str ('ABCD')``)."""
    return "null" if value is None else f"{type(value).__name__} ({value!r:.60})"


def _gold(value) -> int | None:
    """The 0-based index of a gold answer given as a letter ("b", ["B"]), or ``None`` when it is not one."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    return None


def _options(value, field: str, where: str, gold: int | None = None) -> list[str]:
    """The option texts of a row in letter order: from a list of texts, a mapping ``{"A": text, ...}`` or a list of
    ``{"key": "A", "value": text}`` (bigbio/med_qa).

    Trailing null options are left out (a Hub dataset read with :mod:`datasets` fills in ``"E": None`` for a row
    that has fewer options than others), but never below 2 options nor the gold answer's option (``gold``, 0-based).

    Raises:
        BenchmarkError: ``field`` is null, a string or not a list/mapping; the keys are not A, B, C... in order; an
            option is null, not text or empty; fewer than 2 options. The message names ``where`` and the option.
    """
    fix = f"Give '{field}' as a list of option texts [\"text A\", \"text B\", ...] or a mapping {{\"A\": text, ...}}."
    if isinstance(value, list) and value and all(isinstance(o, dict) and {"key", "value"} <= set(o) for o in value):
        value = {o["key"]: o["value"] for o in value}
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: str(k).upper())
        if [str(k).upper() for k in keys] != list(LETTERS[:len(keys)]):
            raise BenchmarkError(f"{where}: option keys {keys} of '{field}' are not the letters A, B, C... in order. "
                                 f"{fix}")
        texts = [value[k] for k in keys]
    elif isinstance(value, (list, tuple)):
        texts = list(value)
    else:
        raise BenchmarkError(f"{where}: '{field}' is {_kind(value)}, not a list of options. {fix}")
    keep = len(texts)
    while keep > 2 and texts[keep - 1] is None and (gold is None or gold < keep - 1):
        keep -= 1
    texts = texts[:keep]
    for i, text in enumerate(texts):
        letter = LETTERS[i] if i < len(LETTERS) else str(i + 1)
        if text is None:
            raise BenchmarkError(f"{where}: option {letter} of '{field}' has no text (null). Give option {letter} "
                                 "its text; every option needs one.")
        if not isinstance(text, str):
            raise BenchmarkError(f"{where}: option {letter} of '{field}' is {_kind(text)}, not text. {fix}")
        if not text.strip():
            raise BenchmarkError(f"{where}: option {letter} of '{field}' is empty. Give option {letter} its text.")
    if len(texts) < 2:
        raise BenchmarkError(f"{where}: '{field}' has {len(texts)} option(s); a multiple-choice item needs at least 2.")
    if len(texts) > len(LETTERS):
        raise BenchmarkError(f"{where}: '{field}' has {len(texts)} options; at most {len(LETTERS)} (A to Z) are read.")
    return texts


def _join_context(value, field: str, where: str) -> str | None:
    """PubMedQA's abstract as one text, from a text, a list of paragraphs or ``{"contexts": [...]}``; ``None`` when
    absent or blank.

    Raises:
        BenchmarkError: anything else (a number, a list holding non-text); names ``where`` and ``field``.
    """
    if value is None:
        return None
    if isinstance(value, dict):  # qiaojin/PubMedQA: {"contexts": [...], "labels": [...], "meshes": [...]}
        value = value.get("contexts", value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = "\n".join(v.strip() for v in value if v.strip())
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}: '{field}' is {_kind(value)}, not text. Give the context as text, a list of "
                             "paragraph texts or {\"contexts\": [paragraphs]}, or leave the field out.")
    return value.strip() or None


def normalize_row(row: dict, index: int = 0, source: str = "<rows>", *, line: int | None = None) -> MCItem:
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

    ``choices`` and ``options`` may each be a list of texts or a mapping letter -> text; trailing null options (as
    :mod:`datasets` fills in for a row with fewer options than others) are left out, other nulls are errors.

    Args:
        row: the parsed row.
        index: its 0-based position (used as id when the row has none, and in messages as ``row index + 1``).
        source: where it came from, for messages.
        line: its 1-based line in a JSONL file; when given, messages name ``line <line>`` instead of the row.

    Raises:
        BenchmarkError: unknown layout (names the fields seen); options null, a string, not a list/mapping, with a
            null, non-text or empty option, or fewer than 2; a context that is not text; an empty question; an
            answer that is not one of the options. The message starts with ``<source> line N`` (or ``row N``).
    """
    where = f"{source} line {line}" if line is not None else f"{source} row {index + 1}"
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    context = None
    if "problem_text" in row and "choices" in row:
        question = row["problem_text"]
        options = _options(row["choices"], "choices", where, _gold(row.get("answer")))
        answer = _letter(row.get("answer"), len(options), where)
        context = _join_context(row.get("context"), "context", where)
        item_id = row.get("problem_id", index)
    elif "options" in row and "answer_idx" in row:
        question = row.get("question")
        options = _options(row["options"], "options", where, _gold(row["answer_idx"]))
        answer = _letter(row["answer_idx"], len(options), where)
        item_id = row.get("id", index)
    elif "final_decision" in row:
        question = row.get("question", row.get("QUESTION"))
        options = list(PUBMEDQA_OPTIONS)
        answer = _text_answer(row["final_decision"], options, where)
        field = "context" if "context" in row else "CONTEXTS"
        context = _join_context(row.get(field), field, where)
        item_id = row.get("pubid", row.get("PUBMED_ID", row.get("pubmed_id", index)))
    elif "question" in row and "choices" in row and "answer" in row:
        question = row["question"]
        options = _options(row["choices"], "choices", where)
        answer = _text_answer(row["answer"], options, where)
        context = _join_context(row.get("context"), "context", where)
        item_id = row.get("id", row.get("question_id", index))
    else:
        raise BenchmarkError(
            f"{where}: unknown layout (fields: {', '.join(sorted(row))}). Supported: problem_text+choices+answer; "
            "question+options+answer_idx (GBaker/MedQA, bigbio/med_qa); question+context+final_decision "
            "(qiaojin/PubMedQA); question+choices+answer (BigBio QA schema)."
        )
    if not isinstance(question, str) or not question.strip():
        raise BenchmarkError(f"{where}: the question is missing or empty.")
    return MCItem(id=str(item_id), question=question.strip(), options=tuple(o.strip() for o in options),
                  answer=answer, context=context)


LANGUAGES = ("en", "zh")  # a benchmark's prompt wording and answer cues (_WORDING, ANSWER_PREFIX)


def spec_of(value) -> dict:
    """A ``benchmarks`` entry (a source string or ``{"source", "config", "split", "language"}``) -> the full dict.

    ``language`` ("en" or "zh") is the benchmark's own prompt wording and answer cues; ``None`` when not given (the
    run's ``language`` then applies, see :func:`measure`).

    Raises:
        BenchmarkError: not a non-blank string or a dict with a ``source`` and only those four keys
            (:func:`medtune.io.sources.parse_source` decides the source's shape), or a language other than
            :data:`LANGUAGES`.
    """
    language = None
    if isinstance(value, dict) and "language" in value:
        language = value["language"]
        if language not in LANGUAGES:
            raise BenchmarkError(f"benchmark spec {value!r}: language must be one of {', '.join(LANGUAGES)}, got "
                                 f"{language!r}.")
        value = {k: v for k, v in value.items() if k != "language"}
    try:
        spec = _sources.parse_source(value)
    except _sources.SourceSpecError:
        raise BenchmarkError(
            f"benchmark spec {value!r}: give a source (local JSONL, package:<pkg>/<file>, or Hub id) or "
            "{source: ..., config: ..., split: ..., language: ...}."
        ) from None
    return {"source": spec.text, "config": spec.config, "split": spec.split, "language": language}


def _cjk(char: str) -> bool:
    return "\u3400" <= char <= "\u9fff" or "\uf900" <= char <= "\ufaff"


def script_of(items: Sequence[MCItem]) -> tuple[str, float]:
    """Which of :data:`LANGUAGES` the items are written in, by their letters: ``("zh", share)`` when at least half of
    the letters of the questions, contexts and options are CJK ideographs, else ``("en", share)``; ``share`` is the
    CJK share of the letters (0 to 1, rounded to 4 places; 0.0 when there are no letters)."""
    cjk = latin = 0
    for item in items:
        for text in (item.question, item.context or "", *item.options):
            for char in text:
                if _cjk(char):
                    cjk += 1
                elif char.isascii() and char.isalpha():
                    latin += 1
    share = cjk / (cjk + latin) if cjk + latin else 0.0
    return ("zh" if share >= 0.5 else "en"), round(share, 4)


def language_note(name: str, value, language: str, items: Sequence[MCItem]) -> str | None:
    """A plain warning when benchmark ``name``'s items are written in another script than the ``language`` it is
    scored in (:func:`script_of`), naming the fix; None when they match.

    Args:
        name: the benchmark's name in the profile. value: its ``benchmarks`` entry (for the fix).
        language: the language it is scored in (its own, else the run's). items: its items.
    """
    script, share = script_of(items)
    if script == language:
        return None
    words = {"en": "English", "zh": "Chinese"}
    source = spec_of(value)["source"]
    return (f"benchmarks.{name}: its items look {words[script]} ({100 * share:.0f}% of their letters are CJK) but it "
            f"is scored with the {words[language]} prompt and answer cues (language: {language}). Fix: give it its "
            f"own language in the profile: benchmarks: {{{name}: {{source: {source}, language: {script}}}}}.")


def language_notes(cfg) -> list[str]:
    """:func:`language_note` for every local or ``package:`` benchmark of ``cfg`` (Hub ids are not read before 04,
    where :func:`measure` prints the same note); sources that cannot be read are left to :func:`validate`.

    Returns:
        One warning per benchmark whose script does not match its language, in profile order.
    """
    notes = []
    for name, value in (cfg.benchmarks or {}).items():
        try:
            spec = spec_of(value)
            if _locate(spec["source"])[0] == "hub":
                continue
            items = read_benchmark(spec["source"], spec["config"], spec["split"])
        except BenchmarkError:
            continue
        note = language_note(name, value, spec["language"] or cfg.language, items)
        if note:
            notes.append(note)
    return notes


_PATH_FIX = ("Fix the path in the profile's 'benchmarks' (a relative path starts from the project folder, where make "
             "runs)")


def _locate(source: str) -> tuple[str, Path | str]:
    """Where a source is read from, without reading it: ``("file", path)`` (local or ``package:``), ``("folder",
    source)`` (a local dataset folder, for :func:`datasets.load_dataset`) or ``("hub", source)`` (an ``owner/name``
    id; nothing is fetched here). The kind is :func:`medtune.io.sources.parse_source`'s.

    Raises:
        BenchmarkError: a ``package:`` file or a ``.jsonl``/``.json`` path that does not exist, a package not
            installed, or a source that is neither an existing file or folder nor shaped like a Hub id (shows the
            resolved path it looked for).
    """
    try:
        spec = _sources.parse_source(source)
    except _sources.SourceSpecError as err:
        raise BenchmarkError(f"benchmark {err}.") from None
    if spec.kind == "package":
        try:
            path = _data.package_path(source)
        except _data.DataError as err:
            raise BenchmarkError(str(err)) from None
        if not path.is_file():
            raise BenchmarkError(f"benchmark file not found: {source} (looked for {path}). Give a file that the "
                                 "package ships, a local JSONL path, or a Hub dataset id 'owner/name'.")
        return "file", path
    if spec.kind == "hub":
        return "hub", source
    path = spec.path
    if spec.kind == "file" and path.is_file():
        return "file", path
    if spec.kind == "file":
        raise BenchmarkError(f"benchmark file not found: {path.resolve()}. {_PATH_FIX}, or give a Hub dataset id "
                             "'owner/name'.")
    if spec.kind == "folder":
        return "folder", source
    raise BenchmarkError(
        f"benchmark source {source!r} is neither an existing file (looked for {path.resolve()}) nor a Hub dataset id "
        f"'owner/name'. {_PATH_FIX}, or give a Hub id such as GBaker/MedQA-USMLE-4-options."
    )


def _network_error(err: BaseException) -> bool:
    """Whether ``err`` or an error it was raised from is a connection failure, a timeout or offline mode."""
    try:
        from huggingface_hub.utils import httpx

        kinds: tuple = (ConnectionError, TimeoutError, httpx.TransportError)
    except ImportError:  # pragma: no cover - an older huggingface_hub
        kinds = (ConnectionError, TimeoutError)
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, kinds):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _load_dataset(source: str, config: str | None, split: str, kind: str):
    """:func:`datasets.load_dataset` (a Hub id or a local dataset folder) with its failures as one message each.

    Raises:
        BenchmarkError: the Hub cannot be reached (network, offline mode, timeout), the dataset is not found or is
            gated, or the config/split does not exist; the message names the source and the fix.
    """
    import datasets

    where = f"benchmark {'Hub dataset' if kind == 'hub' else 'dataset folder'} {source!r}"
    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:300].rstrip(".")
        why = f"{type(err).__name__}: {first}"
        if kind == "hub" and _network_error(err):
            raise BenchmarkError(
                f"{where}: the Hugging Face Hub could not be reached ({why}). Check the network (or HF_ENDPOINT and "
                "proxy settings) and retry; to work offline, load it once where the Hub is reachable (it is then read "
                "from the cache with HF_HUB_OFFLINE=1), or save it as a JSONL file and give that path. No local file "
                f"{Path(source).resolve()} exists either."
            ) from err
        if kind == "hub" and isinstance(err, FileNotFoundError):
            raise BenchmarkError(
                f"{where}: not found ({why}). Check the id on https://huggingface.co/datasets; a gated dataset needs "
                "its terms accepted and a token (HF_TOKEN or `hf auth login`). No local file "
                f"{Path(source).resolve()} exists either."
            ) from err
        if isinstance(err, ValueError):
            raise BenchmarkError(
                f"{where} (config {config!r}, split {split!r}): {why}. Give the right ones in the profile: "
                f"{{source: {source}, config: ..., split: ...}}."
            ) from err
        if isinstance(err, OSError):
            raise BenchmarkError(f"{where}: could not be loaded ({why}).") from err
        raise


def _rows(source: str, config: str | None = None, split: str | None = None,
          limit: int | None = None, remote=None) -> tuple[str, str, list[tuple[int, object]]]:
    """The raw rows of a source, before :func:`normalize_row`: ``(name for messages, unit, [(number, row)])``.

    ``unit`` is "line" (a JSONL file: 1-based line numbers, blank lines counted) or "row" (a JSON array, a dataset:
    1-based position). An unparseable line is kept as a :class:`medtune.stages.data.Unreadable`.

    Raises:
        BenchmarkError: see :func:`_locate` and :func:`_load_dataset`; a file that is not JSONL at all; no rows.
    """
    kind, where = _locate(source)
    if kind == "file":
        try:
            records = _data.read_records(where)
        except _data.DataError as err:
            raise BenchmarkError(str(err)) from None
        name, unit, rows = str(where), records.unit, list(records)
        if not rows:
            raise BenchmarkError(f"{name}: no items (the file has no rows). Give a benchmark file with at least one "
                                 "item (one JSON object a line), or remove it from the profile's 'benchmarks'.")
    elif kind == "hub" and remote is not None:  # through medtune.io.sources: the profile's source, mirror and token
        try:
            ds = remote.load_dataset(source, config, split or "test")
        except _sources.SourceError as err:
            raise BenchmarkError(f"benchmark {source!r}: {err}") from None
        except ValueError as err:  # from datasets: an unknown config or split
            raise BenchmarkError(f"benchmark Hub dataset {source!r} (config {config!r}, split {split or 'test'!r}): "
                                 f"{err}. Give the right ones in the profile: {{source: {source}, config: ..., "
                                 "split: ...}.") from None
    else:
        ds = _load_dataset(source, config, split or "test", kind)
    if kind != "file":
        if len(ds) == 0:
            raise BenchmarkError(f"{source} (config {config!r}, split {split or 'test'!r}): no items (the split has "
                                 "no rows). Give a split with items, or remove it from the profile's 'benchmarks'.")
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        name, unit, rows = source, "row", list(enumerate(ds.to_list(), start=1))
    return name, unit, rows if limit is None else rows[:limit]


def _item(number: int, value, index: int, name: str, unit: str) -> MCItem:
    """One raw row from :func:`_rows` -> :class:`MCItem`; an unreadable line is a :class:`BenchmarkError` too."""
    if isinstance(value, _data.Unreadable):
        raise BenchmarkError(f"{name} {unit} {number}: {value}. A benchmark file must be JSONL: one JSON object a "
                             "line.")
    return normalize_row(value, index, name, line=number if unit == "line" else None)


def read_benchmark(source: str, config: str | None = None, split: str | None = None,
                   limit: int | None = None, remote=None) -> list[MCItem]:
    """Read a benchmark and normalize every row (:func:`normalize_row`).

    Args:
        source: a local JSONL path, ``package:<pkg>/<file>.jsonl``, a Hub dataset id ``owner/name`` (like
            ``GBaker/MedQA-USMLE-4-options``) or a local dataset folder (both read by :func:`datasets.load_dataset`).
            Anything else is an error at once (no Hub request).
        config: the dataset config (``qiaojin/PubMedQA`` needs ``pqa_labeled``); ignored for JSONL files.
        split: the split (default "test"; ``qiaojin/PubMedQA`` has only "train"); ignored for JSONL files.
        limit: keep the first ``limit`` items, in source order (``None``: all).
        remote: the :class:`medtune.io.sources.Source` to download a Hub id from (the profile's source, mirror and
            token: :func:`measure` passes it); None reads a Hub id with ``datasets.load_dataset`` directly.

    Returns:
        The items, in source order (at least one).

    Raises:
        BenchmarkError: a missing file (shows the resolved path), a source that is neither a file nor a Hub id
            ``owner/name``, an unreachable Hub or a missing dataset/config/split, an unreadable line, a bad row (names
            the file and line), or no items at all.
    """
    name, unit, rows = _rows(source, config, split, limit, remote)
    return [_item(number, value, i, name, unit) for i, (number, value) in enumerate(rows)]


def validate(cfg) -> list[str]:
    """Check every benchmark of ``cfg.benchmarks`` before any model loads (the preflight of notebook 00).

    For each entry: the spec's shape (:func:`spec_of`); for a local JSONL file, a ``package:`` file or a local
    dataset folder, every row of the whole source (``benchmark_limit`` ignored) read and normalized as
    :func:`read_benchmark` does (a missing file, an unreadable line, a bad row, no items); for a Hub id, only that it
    is shaped ``owner/name``: no network call, so the dataset itself is checked when 04 reads it.

    Returns:
        Human-readable problems, each ``"benchmarks.<name>: <message>"`` (the message names the file and line and
        the fix), in profile order; for one source at most 20 bad rows are spelled out, then a count of the rest.
        An empty list when every benchmark is fine (or the profile lists none).
    """
    problems: list[str] = []
    for name, value in (cfg.benchmarks or {}).items():
        label = f"benchmarks.{name}"
        try:
            spec = spec_of(value)
            if _locate(spec["source"])[0] == "hub":
                continue
            source, unit, rows = _rows(spec["source"], spec["config"], spec["split"])
        except BenchmarkError as err:
            problems.append(f"{label}: {err}")
            continue
        bad = []
        for i, (number, row) in enumerate(rows):
            try:
                _item(number, row, i, source, unit)
            except BenchmarkError as err:
                bad.append(f"{label}: {err}")
        problems += bad[:_LISTED]
        if len(bad) > _LISTED:
            problems.append(f"{label}: ... and {len(bad) - _LISTED} more bad rows in {source} "
                            f"({len(bad)} of {len(rows)}).")
    return problems


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
    body = (item.question if item.context is None
            else f"{w['context']}\n{item.context}\n\n{w['question']}\n{item.question}")
    return f"{body}\n\n{w['options']}\n{opts}\n\n{w['ask']}"


def mc_prompt(item: MCItem, language: str = "en") -> str:
    """The full test prompt for an item: :func:`medtune.stages.data.test_prompt` around :func:`mc_question`."""
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
    """What follows an answer statement: a letter, an option's text, ``False`` (ambiguous), or ``None`` (neither).

    An option's whole text (2+ characters) wins over a letter: "the answer is A reduction in diastolic filling time"
    names option D of MedQA item 13, not A; "the answer is D-dimer" names C of item 543."""
    n = len(options)
    low = rest.lower()
    hits = []
    for i, o in enumerate(options):
        for form in dict.fromkeys((o.lower(), _plain(o).lower())):
            if form and low.startswith(form) and not low[len(form):len(form) + 1].isalnum():
                hits.append((len(form), i))
    text_hit = LETTERS[max(hits)[1]] if hits else None
    if text_hit and max(hits)[0] >= 2:
        return text_hit
    if re.match(r"[A-Za-z](?![A-Za-z0-9])", rest):
        letter = rest[0]
        lower_word = letter.islower() and re.match(r"\s+[A-Za-z]", rest[1:])  # "the answer is a beta blocker"
        if letter.upper() in LETTERS[:n] and not lower_word:
            if _AMBIGUOUS_AFTER.match(rest[1:]):
                return False
            return letter.upper()
    return text_hit


# One listed option at the start of a text: an optional opening bracket, the letter (not part of a word), then its
# closing bracket or punctuation ("A.", "A)", "(A)", "[A]", "A:", "A、", "A："), markup and spaces around it.
_LIST_MARKER = re.compile(r"[\s*_`]*[(\[（【]?([A-Za-z])(?![A-Za-z0-9])([)\]）】]?\s*[.:：、)]?)[\s*_`\"'“”‘’]*")
_LIST_TAIL = re.compile(r"[\s*_`\"'“”‘’.,;:。，；：]*")


def _plain(option: str) -> str:
    """An option's text as it is matched in an echo: whitespace runs as one space, surrounding quotes and
    punctuation dropped (some real MedQA options end in a line break and a stray quote)."""
    return " ".join(option.split()).strip(" \"'“”‘’.,;:。，；：*_`")


def listed_letters(line: str, options: Sequence[str]) -> list[str] | None:
    """The letters of a line that does nothing but list options, as the prompt shows them, or ``None``.

    A listed option is a letter marker (``A.``, ``A)``, ``(A)``, ``A:``, ``A、``, ``**A.**``; a bare ``A`` only before
    its text or alone on the line) followed by that letter's own option text (case, runs of whitespace and surrounding
    quotes and punctuation ignored) or by nothing. A line may
    list several options ("A. yes B. no C. maybe"). Used by :func:`extract_choice` to tell an echo of the option list
    from an answer.

    Args:
        line: one line of text (no line break).
        options: the item's option texts, in letter order.

    Returns:
        The listed letters in line order (upper case; at least one), or ``None`` when the line holds anything else
        (a word that is not an option's text, a letter beyond the options, a blank line).
    """
    letters: list[str] = []
    pos, n = 0, len(options)
    while pos < len(line):
        m = _LIST_MARKER.match(line, pos)
        if not m or m.group(1).upper() not in LETTERS[:n]:
            return None
        letter, marked, pos = m.group(1).upper(), bool(m.group(2).strip()), m.end()
        text = _plain(options[LETTERS.index(letter)])
        has_text = (line[pos:pos + len(text)].lower() == text.lower()
                    and not line[pos + len(text):pos + len(text) + 1].isalnum())
        if has_text:
            pos += len(text)
        elif not marked and line[pos:].strip(" \t*_`"):
            return None  # a bare letter followed by other words: "A 45-year-old man ..."
        letters.append(letter)
        pos = _LIST_TAIL.match(line, pos).end()
    return letters or None


def _heads_listing(rest: str, options: Sequence[str]) -> bool:
    """Whether the text after an answer statement is an option list that starts there ("Answer:\nA. x\nB. y"):
    its first line and the listing lines that follow it (blank lines between them allowed) name 2+ letters."""
    lines = rest.split("\n")
    first = listed_letters(lines[0].strip(), options)
    if first is None:
        return False
    seen = set(first)
    for line in lines[1:]:
        if not line.strip():
            continue
        more = listed_letters(line.strip(), options)
        if more is None:
            break
        seen.update(more)
    return len(seen) >= 2


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text answer gives, or ``None`` when it cannot be read (counted as wrong).

    The rule, applied to :func:`answer_part` of ``text`` (the text after ``</think>`` when there is one):

    1. Answer statements: "answer is X", "answer: X", "final/correct/best answer X", "correct option is X",
       "答案是X", "答案：X", "正确答案为X"..., with optional ``*``, ``(``, quotes or "option" between the statement and
       ``X``. ``X`` is a letter of the item's options (either case; a lower-case letter followed by a word, as in
       "the answer is a beta blocker", is not a letter) or the text of an option ("the answer is yes"). The LAST
       statement wins, so an explanation after it that names other letters does not change it. If that statement
       names several letters ("the answer is B or C"), or its letter starts a list of the options ("Answer:\nA. x\n
       B. y"), the answer is ``None``.
    2. Otherwise, a lone letter at the very start: "C", "C.", "(C)", "**C**", "c)" followed by punctuation or the
       end of the line; but not when the text echoes the option list (lines that only list options, by
       :func:`listed_letters`, naming 2+ different letters) and its first line is part of that list. "A. 2小时\n
       B. 4小时内\n..." and "A. x B. y C. z D. w" are echoes, not answers.
    3. Otherwise ``None``: text that only mentions letters ("A is wrong, B might be right, C...") without a
       statement is unparseable, even if it names a single letter; so is an echo of the options.

    Args:
        text: the generated text (special tokens already removed).
        options: the item's option texts, in letter order (their number bounds the letters).

    Returns:
        An upper-case letter among the first ``len(options)``, or ``None``.
    """
    region = answer_part(text)
    last = None  # the last statement's reading: a letter, or False when it names several letters or heads a list
    for m in _STATEMENT.finditer(region):
        got = _statement_choice(region[m.end():], options)
        if got and _heads_listing(region[m.end():], options):
            got = False
        if got is not None:
            last = got
    if last is not None:
        return last or None
    listing = {line_no: letters for line_no, line in enumerate(region.splitlines())
               if (letters := listed_letters(line.strip(), options))}
    first_line = next((i for i, line in enumerate(region.splitlines()) if line.strip()), None)
    if first_line in listing and len({x for letters in listing.values() for x in letters}) >= 2:
        return None
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
def continuation_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], *,
                          batch_size: int | str = 4) -> list[float]:
    """Sum of log-probabilities (natural log, nats) of each continuation given its prompt.

    ``prompt`` is tokenized alone and ``prompt + continuation`` together; the continuation's tokens are those
    from where the two sequences diverge (as :func:`medtune.evaluation.heldout.response_loss` and TRL do), so a
    continuation that merges with the prompt's last token is still scored correctly. Sequences that need the same
    forward pass (same context, one continuation token: the usual case for option letters) are computed once.

    Args:
        model: a causal LM (4-bit, optionally with a PEFT adapter).
        tokenizer: its tokenizer (a pad token set).
        pairs: ``(prompt, continuation)`` strings.
        batch_size: sequences per forward pass (right-padded), or ``"auto"``: as many as free GPU memory holds
            (:func:`medtune.evaluation.heldout.resolve_batch_size`), longest sequences first.

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
        start = next((i for i, (a, b) in enumerate(zip(p_ids, full, strict=False)) if a != b),
                     min(len(p_ids), len(full)))
        if start >= len(full):
            raise ValueError(f"continuation {cont!r} adds no token to its prompt.")
        start = max(start, 1)  # the first token of a sequence has no prediction
        targets.append((tuple(full[:-1]), start, full[start:]))
    unique = list(dict.fromkeys(t[0] for t in targets))
    logprobs: dict[tuple[int, ...], tuple[int, torch.Tensor]] = {}  # sequence -> (first position, log-probs)
    from medtune.evaluation.heldout import progress

    size = resolve_batch_size(batch_size, model, max((len(u) for u in unique), default=1), len(unique))
    if batch_size == "auto":  # similar lengths together: less padding (results are keyed by sequence)
        unique.sort(key=lambda u: -len(u))
    batches = [unique[i:i + size] for i in range(0, len(unique), size)]
    needed: dict[tuple[int, ...], int] = {}
    for seq, start, _ in targets:  # earliest scored position per sequence: only those logits are kept
        needed[seq] = min(needed.get(seq, len(seq)), start - 1)
    for batch in progress(batches, len(batches), "option log-likelihood"):
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
                   batch_size: int | str = 4) -> list[dict]:
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
    template = LETTER_CONTINUATION[language] if target == "letter" else _TEXT_CONTINUATION[language]
    pairs, spans = [], []
    for item in items:
        prompt = mc_prompt(item, language) + ANSWER_PREFIX[language]
        start = len(pairs)
        pairs += [(prompt, template.format(letter=LETTERS[i], text=o)) for i, o in enumerate(item.options)]
        spans.append((start, len(pairs)))
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    out = []
    for item, (a, b) in zip(items, spans, strict=True):
        s = scores[a:b]
        pred = LETTERS[max(range(len(s)), key=lambda i: (s[i], -i))]
        out.append({"id": item.id, "answer": item.answer, "predicted": pred, "correct": pred == item.answer,
                    "parsed": True, "scores": [round(x, 4) for x in s]})
    return out


def predict_generate(model, tokenizer, items: Sequence[MCItem], *, language: str = "en", max_new_tokens: int = 1200,
                     batch_size: int | str = 4) -> list[dict]:
    """Generate a greedy answer to each item with the test template and read its letter (:func:`extract_choice`).

    Returns:
        One dict per item: ``{"id", "answer", "predicted" (letter or None), "correct", "parsed", "output",
        "new_tokens", "stopped"}``; unparseable outputs have ``parsed`` False and count as wrong.
    """
    from medtune.evaluation.heldout import generate_answers

    rows = [{"row": item.id, "Question": mc_question(item, language)} for item in items]
    gens = generate_answers(model, tokenizer, rows, language=language, max_new_tokens=max_new_tokens,
                            batch_size=batch_size)
    out = []
    for item, g in zip(items, gens, strict=True):
        pred = extract_choice(g["answer"], item.options)
        out.append({"id": item.id, "answer": item.answer, "predicted": pred, "correct": pred == item.answer,
                    "parsed": pred is not None, "output": g["answer"], "new_tokens": g["new_tokens"],
                    "stopped": g["stopped"]})
    return out


ONE_LETTER_SHARE = 0.9  # one letter this share or more of the readable predictions: the table says so plainly


def summarize(predictions: Sequence[dict], items: Sequence[MCItem]) -> dict:
    """Accuracy, parse failures and the spread of the predicted letters over one benchmark's predictions.

    Returns:
        ``{"items", "correct", "accuracy" (correct / items; unparseable count as wrong), "unparsed",
        "unparsed_share", "chance" (mean of 1 / options: the accuracy of guessing), "predicted_counts"
        ({letter or "unparsed": count}), "answer_counts" ({letter: count} of the right answers, every option letter),
        "predicted_spread" (:func:`spread`: ``"A 0 · B 1 · C 0 · D 7"``), "top_letter" (the letter predicted most;
        ties: the first), "top_share" (its share of the readable predictions), "warning" (a plain sentence when
        ``top_share`` >= :data:`ONE_LETTER_SHARE` over 2+ readable predictions, else None)}``. Shares are fractions
        in [0, 1] rounded to 4 places; ``None`` when empty.
    """
    n = len(predictions)
    correct = sum(bool(p["correct"]) for p in predictions)
    unparsed = sum(not p["parsed"] for p in predictions)
    counts = Counter(p["predicted"] or "unparsed" for p in predictions)
    letters = LETTERS[:max((len(i.options) for i in items), default=0)]
    answers = Counter(i.answer for i in items)
    read = {k: v for k, v in counts.items() if k != "unparsed"}
    top = max(sorted(read), key=lambda k: read[k]) if read else None
    top_share = round(read[top] / sum(read.values()), 4) if top else None
    warning = None
    if top and top_share >= ONE_LETTER_SHARE and sum(read.values()) >= 2:
        warning = (f"{top} is {read[top]} of {sum(read.values())} readable predictions ({100 * top_share:.0f}%), "
                   f"but the right answer of only {answers[top]} of {len(items)} items "
                   f"({100 * answers[top] / len(items):.0f}%). The model hardly tells the options apart, so this "
                   f"accuracy mostly counts how often {top} is right; it is no sign of medical knowledge.")
    out = {
        "items": n,
        "correct": correct,
        "accuracy": round(correct / n, 4) if n else None,
        "unparsed": unparsed,
        "unparsed_share": round(unparsed / n, 4) if n else None,
        "chance": round(sum(1 / len(i.options) for i in items) / n, 4) if n else None,
        "predicted_counts": dict(sorted(counts.items())),
        "answer_counts": {k: answers[k] for k in letters},
    }
    return {
        **out,
        "predicted_spread": spread(out),
        "top_letter": top,
        "top_share": top_share,
        "warning": warning,
    }


def spread(result: dict) -> str:
    """The predicted letters of one :func:`summarize` result as text, every option letter with its count (``A 0 · B 1
    · C 0 · D 7``), then the unreadable answers when there are any (``· unreadable 2``)."""
    counts = result.get("predicted_counts") or {}
    letters = list(result.get("answer_counts") or {}) or sorted(k for k in counts if k != "unparsed")
    parts = [f"{k} {counts.get(k, 0)}" for k in letters]
    if counts.get("unparsed"):
        parts.append(f"unreadable {counts['unparsed']}")
    return " · ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# One call per notebook cell (04 and 06)
# ----------------------------------------------------------------------------------------------------------------

def predictions_path(run, stage: str, name: str) -> Path:
    """``<run>/benchmarks/<stage>-<name>.jsonl``: one line per item with the prediction."""
    return run.path / "benchmarks" / f"{stage}-{name}.jsonl"


def _remote(cfg, source: str):
    """Where a benchmark's Hub id is downloaded from: the dataset's source (``dataset_source`` or ``source``) and
    ``hub_endpoint``, through :mod:`medtune.io.sources` like the training data; None for local files and folders.

    Raises:
        BenchmarkError: a Hub id with ``source: local`` (no downloads).
    """
    if _locate(source)[0] != "hub":
        return None
    try:
        return _sources.for_spec(source, cfg.dataset_source or cfg.source, cfg.hub_endpoint, "benchmark dataset")
    except FileNotFoundError as err:
        raise BenchmarkError(str(err)) from None


def measure(cfg, run, model, tokenizer, stage: str) -> dict:
    """Score every benchmark of ``cfg.benchmarks`` (first ``cfg.benchmark_limit`` items, ``cfg.benchmark_mode``),
    each in its own ``language`` when its entry gives one, else in ``cfg.language``; a benchmark whose items are
    written in another script than that language gets a printed warning (:func:`language_note`).

    Per-item predictions go to :func:`predictions_path`. Generation uses ``cfg.max_new_tokens`` and
    ``cfg.generation_batch_size``; log-likelihood uses ``cfg.eval_batch_size``.

    Args:
        stage: "baseline" (04) or "finetuned" (06); names the prediction files.

    Returns:
        ``{name: summarize(...) | {"source", "mode", "language"}}``; ``{}`` when the profile lists no benchmarks.

    Raises:
        BenchmarkError: a source cannot be read (names it and the row).
    """
    results = {}
    if not cfg.benchmarks:
        print("no benchmarks in this profile (the 'benchmarks' key is empty): nothing to score.")
    for name, value in cfg.benchmarks.items():
        spec = spec_of(value)
        items = read_benchmark(spec["source"], spec["config"], spec["split"], cfg.benchmark_limit,
                               remote=_remote(cfg, spec["source"]))
        language = spec["language"] or cfg.language
        print(f"{name}: {len(items)} items from {spec['source']}, mode {cfg.benchmark_mode}, language {language}",
              flush=True)
        note = language_note(name, value, language, items)
        if note:
            print(f"warning: {note}", flush=True)
        if cfg.benchmark_mode == "loglik":
            preds = predict_loglik(model, tokenizer, items, language=language, batch_size=cfg.eval_batch_size)
        else:
            preds = predict_generate(model, tokenizer, items, language=language,
                                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size)
        _data.write_jsonl(preds, predictions_path(run, stage, name))
        results[name] = {"source": spec["source"], "mode": cfg.benchmark_mode, "language": language,
                         **summarize(preds, items)}
        if results[name]["warning"]:
            print(f"warning, {name}: {results[name]['warning']}", flush=True)
    return results


def show(results: dict) -> str:
    """Markdown table of :func:`measure`'s results for one stage: accuracy beside chance and the spread of the
    predicted letters, then a plain warning for each benchmark where one letter is most of the predictions."""
    if not results:
        return "_No benchmarks in this profile._"
    lines = ["| benchmark | mode | language | items | correct | accuracy | chance | predicted letters | "
             "right answers | unparseable (share) |",
             "|---|---|---|---:|---:|---:|---:|---|---|---:|"]
    for name, r in results.items():
        right = " · ".join(f"{k} {v}" for k, v in (r.get("answer_counts") or {}).items())
        lines.append(f"| {name} | {r['mode']} | {r.get('language', '')} | {r['items']} | {r['correct']} | "
                     f"{r['accuracy']} | {r['chance']} | {r.get('predicted_spread') or spread(r)} | {right} | "
                     f"{r['unparsed']} ({r['unparsed_share']}) |")
    warnings = [f"**Warning, {name}:** {r['warning']}" for name, r in results.items() if r.get("warning")]
    return "\n".join(lines + ([""] + warnings if warnings else []))


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
