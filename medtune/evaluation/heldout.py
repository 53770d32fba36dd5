"""Evaluation before (04) and after (06) fine-tuning, on the same held-out examples.

- :func:`generate_answers`: greedy answers to held-out questions with the test template (batched, left-padded).
- :func:`response_loss`: mean negative log-likelihood of the reference response (reasoning + answer + EOS)
  given the test prompt, and its perplexity ``exp(loss)`` (Jelinek et al. 1977; the usual LM definition).
- :func:`generation_metrics`: scores of generated answers against the dataset's ``Response``: ROUGE-L F1 of the
  answer part (:func:`answer_part`: the text after ``</think>``), answer length, the share that
  stopped with EOS, the share that follows the template (:func:`follows_template`).
- :func:`metrics_table` and :func:`plot_comparison`: baseline (04) against fine-tuned (06).

Multiple-choice benchmarks (MedQA, PubMedQA) are in :mod:`medtune.evaluation.multiple_choice`.
"""

from __future__ import annotations

import math
import re
import sys
import time

import torch

from medtune.evaluation.batching import auto_batch_size
from medtune.families import is_llama4
from medtune.llama4.decode import fits_static_cache, greedy_decode
from medtune.settings import config as _config
from medtune.stages import data as _data


def _device(model) -> torch.device:
    return next(p for p in model.parameters()).device


def progress(iterable, total: int, desc: str, unit: str = "it"):
    """A text progress bar over ``iterable`` (``total`` items, labelled ``desc``, counted in ``unit``; ``iterable``
    None: advanced by ``update(n)``) that reads both live in JupyterLab and in the executed notebook (no widgets).
    Also used by :mod:`medtune.evaluation.multiple_choice`."""
    from tqdm.std import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stdout, mininterval=2.0, ascii=True)


def resolve_batch_size(batch_size: int | str, model, seq_len: int, items: int, *, full_logits: bool = False) -> int:
    """``batch_size`` as a number: an int as it is; ``"auto"`` on a GPU as many sequences of ``seq_len`` tokens as
    the free memory holds (:func:`medtune.evaluation.batching.auto_batch_size`, at most ``items``; ``full_logits``
    when every position's logits are kept), on the CPU ``CPU_BATCH_SIZE`` (memory is rarely the limit there; time is).

    Raises:
        ValueError: ``batch_size`` is neither a whole number >= 1 nor ``"auto"``.
    """
    if batch_size != "auto":
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a whole number >= 1 or 'auto', got {batch_size!r}")
        return batch_size
    if _device(model).type != "cuda":
        return min(CPU_BATCH_SIZE, max(items, 1))
    return auto_batch_size(model, max(seq_len, 1), limit=max(items, 1), full_logits=full_logits)


CPU_BATCH_SIZE = 4  # "auto" on the CPU: the batch the default profile has always used


def _fast_decode_ok(model, total_len: int) -> bool:
    """Llama 4 on a GPU whose prompt + answer fit one attention chunk: :func:`medtune.llama4.decode.greedy_decode`
    (static cache, CUDA graph per step, fused NF4 experts) instead of ``model.generate``."""
    return _device(model).type == "cuda" and is_llama4(model) and fits_static_cache(model, total_len)


@torch.no_grad()
def generate_answers(model, tokenizer, rows: list[dict], *, language: str = "en", max_new_tokens: int = 1200,
                     batch_size: int | str = 4) -> list[dict]:
    """Greedy answers to ``rows``' questions with the test template.

    Llama 4 on a GPU decodes with :func:`medtune.llama4.decode.greedy_decode` (the same greedy tokens as
    ``generate`` up to floating-point summation order, several times faster: docs/bench-h200.md); other models and
    the CPU use ``model.generate``. With ``batch_size="auto"`` on a GPU the questions are sorted by prompt length
    and batched as far as free memory allows; with an int, batches are taken in order (the default profile's
    answers are the same as before).

    Args:
        model: a causal LM (4-bit, optionally with a PEFT adapter, never merged).
        tokenizer: its tokenizer (pad token distinct from EOS).
        rows: held-out rows with ``Question`` (and ``row``, the dataset index).
        language: template language.
        max_new_tokens: generation budget per answer, in tokens (walkthrough: 1200).
        batch_size: questions per batch, or ``"auto"`` (:func:`resolve_batch_size`).

    Returns:
        One dict per row, in ``rows``' order: ``{"row", "question", "answer", "new_tokens", "stopped"}``;
        ``stopped`` is True when the model emitted EOS before ``max_new_tokens``; ``answer`` is the decoded text
        without special tokens.
    """
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    prompts = [_data.test_prompt(r["Question"], language) for r in rows]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    longest = max(lengths, default=0)
    size = resolve_batch_size(batch_size, model, longest + max_new_tokens, len(rows))
    order = list(range(len(rows)))
    if batch_size == "auto":  # similar lengths together: less padding
        order.sort(key=lambda i: -lengths[i])
    fast = _fast_decode_ok(model, longest + max_new_tokens)
    results: dict[int, dict] = {}
    try:
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        # counted in questions, not batches: on a GPU all of them are often one batch, and "0/1" says nothing
        bar = progress(None, len(rows), "generating", unit="answer")
        generated, started = 0, time.perf_counter()
        for batch in batches:
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(_device(model))
            if fast:
                def live(steps: int, batch_started: float = time.perf_counter(), n: int = len(batch)) -> None:
                    # one batch is often every question: without this the bar says nothing for minutes
                    rate = steps * n / max(time.perf_counter() - batch_started, 1e-9)
                    bar.set_postfix_str(f"{steps}/{max_new_tokens} tokens per answer, {rate:.1f} new tokens/s "
                                        f"over {n} sequences (counting finished ones)", refresh=True)

                new = greedy_decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                                    eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                                    on_tokens=live)
            else:
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                new = gen[:, enc["input_ids"].shape[1]:]
            for i, ids in zip(batch, new.tolist(), strict=True):
                r = rows[i]
                stopped = tokenizer.eos_token_id in ids
                n = (ids.index(tokenizer.eos_token_id) + 1 if stopped
                     else len([t for t in ids if t != tokenizer.pad_token_id]))
                generated += n
                results[i] = {"row": r.get("row"), "question": r["Question"],
                              "answer": tokenizer.decode(ids[:n], skip_special_tokens=True).strip(),
                              "new_tokens": n, "stopped": stopped}
            bar.set_postfix_str(f"{generated / max(time.perf_counter() - started, 1e-9):.1f} new tokens/s over all "
                                f"sequences, batch {size}", refresh=False)
            bar.update(len(batch))
        bar.close()
    finally:
        tokenizer.padding_side = side
    return [results[i] for i in range(len(rows))]


@torch.no_grad()
def response_loss(model, tokenizer, rows: list[dict], *, language: str = "en", batch_size: int | str = 4,
                  max_length: int | None = None) -> dict:
    """Held-out loss and perplexity on the response part (reasoning + answer + EOS) given the test prompt.

    The prompt is tokenized alone and with the completion; the completion starts where the two token sequences
    diverge (as TRL does), and only those tokens are scored.

    Args:
        rows: held-out rows with ``Question``, ``Complex_CoT``, ``Response``.
        batch_size: sequences per forward pass, or ``"auto"`` (:func:`resolve_batch_size`).
        max_length: truncate each sequence to this many tokens (use the training ``max_length``).

    Returns:
        ``{"loss": mean NLL in nats/token, "perplexity": exp(loss), "tokens": scored tokens, "examples": n}``.
    """
    model.eval()
    device = _device(model)
    nll_sum, count = 0.0, 0
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        seqs = []
        for r in rows:
            ex = _data.train_example(r, tokenizer.eos_token, language)
            p_ids = tokenizer(ex["prompt"])["input_ids"]
            full = tokenizer(ex["prompt"] + ex["completion"])["input_ids"]
            start = next((i for i, (a, b) in enumerate(zip(p_ids, full, strict=False)) if a != b),
                         min(len(p_ids), len(full)))
            labels = [-100] * start + full[start:]
            if max_length:
                full, labels = full[:max_length], labels[:max_length]
            seqs.append((full, labels))
        size = resolve_batch_size(batch_size, model, max((len(f) for f, _ in seqs), default=1), len(seqs),
                                  full_logits=True)
        if batch_size == "auto":  # similar lengths together; the sums below do not depend on the order
            seqs.sort(key=lambda s: -len(s[0]))
        batches = [seqs[i:i + size] for i in range(0, len(seqs), size)]
        for batch in progress(batches, len(batches), "held-out loss"):
            width = max(len(f) for f, _ in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for i, (f, lab) in enumerate(batch):
                ids[i, :len(f)] = torch.tensor(f)
                mask[i, :len(f)] = 1
                labels[i, :len(lab)] = torch.tensor(lab)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(device)
            nll_sum += torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100,
                                                         reduction="sum").item()
            count += int((shift_labels != -100).sum())
    finally:
        tokenizer.padding_side = side
    loss = nll_sum / max(count, 1)
    return {"loss": round(loss, 5), "perplexity": round(math.exp(loss), 4), "tokens": count, "examples": len(rows)}


def summarize(answers: list[dict]) -> dict:
    """Counts over generated answers: mean new tokens and the share that stopped with EOS."""
    n = len(answers)
    return {
        "answers": n,
        "mean_new_tokens": round(sum(a["new_tokens"] for a in answers) / n, 1) if n else None,
        "stopped_with_eos": round(sum(a["stopped"] for a in answers) / n, 3) if n else None,
    }


class _CharTokenizer:
    """ROUGE tokens for Chinese: every CJK character, and lower-cased ASCII letters/digits runs
    (rouge_score's default tokenizer drops every non-ASCII character, which would score Chinese text as empty)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return re.findall(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[a-z0-9]+", text.lower())


def rouge_l(prediction: str, reference: str, language: str = "en") -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (Lin 2004), computed by the ``rouge-score`` package.

    ``RougeScorer(["rougeL"])`` with its defaults for English (lower-cased, non-alphanumeric characters as spaces,
    no stemming): with LCS the longest common subsequence of the two token lists, precision = LCS / prediction
    tokens, recall = LCS / reference tokens, F1 = 2PR / (P + R). For ``language="zh"`` the tokens are single CJK
    characters (and ASCII words), since the package's tokenizer drops non-ASCII text.

    Returns:
        F1 in [0, 1]; 0.0 when either text has no tokens.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer() if language == "zh" else None)
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def answer_part(text: str) -> str:
    """The answer of a generation: the text after the last ``</think>``; without one, the whole text (a leading
    ``<think>`` removed). Stripped of surrounding whitespace."""
    if _data.THINK_CLOSE in text:
        return text.rsplit(_data.THINK_CLOSE, 1)[1].strip()
    return text.strip().removeprefix(_data.THINK_OPEN).strip()


def follows_template(text: str) -> bool:
    """True when a generation has the trained shape: reasoning in one think block, then an answer.

    The exact rule, on the decoded text stripped of surrounding whitespace: it starts with ``<think>``; it holds
    exactly one ``<think>`` and exactly one ``</think>``; the reasoning between them is not blank; and the answer
    after ``</think>`` is not blank. (The training completion is ``<think>\\n{reasoning}\\n</think>\\n{answer}<eos>``,
    :func:`medtune.stages.data.completion_text`.)
    """
    t = text.strip()
    if not t.startswith(_data.THINK_OPEN) or t.count(_data.THINK_OPEN) != 1 or t.count(_data.THINK_CLOSE) != 1:
        return False
    reasoning, _, answer = t[len(_data.THINK_OPEN):].partition(_data.THINK_CLOSE)
    return bool(reasoning.strip()) and bool(answer.strip())


def generation_metrics(answers: list[dict], references: dict, language: str = "en") -> dict:
    """Scores of generated answers against the reference responses.

    Args:
        answers: :func:`generate_answers` output (``row``, ``answer``, ``new_tokens``, ``stopped``).
        references: ``{row: reference Response text}``, one for every answer's ``row``.
        language: "zh" switches ROUGE-L to character tokens (:func:`rouge_l`).

    Returns:
        :func:`summarize`'s counts plus ``"rouge_l"`` (mean ROUGE-L F1 of each answer's part after ``</think>``,
        :func:`answer_part`, against its Response; in [0, 1]), ``"mean_answer_chars"`` (mean
        length of that answer part, characters) and ``"template_share"`` (share with :func:`follows_template`).
        Shares and means are rounded (3 and 1 decimals, 4 for ROUGE-L); ``None`` when there are no answers.

    Raises:
        KeyError: an answer's row has no reference.
    """
    n = len(answers)
    parts = [answer_part(a["answer"]) for a in answers]
    out = summarize(answers)
    out["rouge_l"] = (round(sum(rouge_l(p, references[a["row"]], language)
                                for p, a in zip(parts, answers, strict=True)) / n, 4) if n else None)
    out["mean_answer_chars"] = round(sum(len(p) for p in parts) / n, 1) if n else None
    out["template_share"] = round(sum(follows_template(a["answer"]) for a in answers) / n, 3) if n else None
    return out


def side_by_side(baseline: list[dict], finetuned: list[dict]) -> str:
    """Markdown with each held-out question, the un-tuned answer and the fine-tuned answer."""
    by_row = {a["row"]: a for a in finetuned}
    parts = []
    for b in baseline:
        f = by_row.get(b["row"], {"answer": "(missing)"})
        parts.append(
            f"### Dataset row {b['row']}\n\n**Question.** {_html_safe(b['question'])}\n\n"
            f"| baseline (un-tuned) | fine-tuned (LoRA) |\n|---|---|\n"
            f"| {_cell(b['answer'])}{_cut_note(b)} | {_cell(f['answer'])}{_cut_note(f)} |\n"
        )
    return "\n".join(parts)


def _cut_note(answer: dict) -> str:
    """A table cell's note for an answer cut off at max_new_tokens (no EOS), else nothing."""
    if answer.get("stopped") is False:
        return f"<br><br>*(cut off: {answer.get('new_tokens')} tokens, max_new_tokens, no EOS)*"
    return ""


def _html_safe(text: str) -> str:
    """Escape ``&``, ``<`` and ``>`` so that Markdown shows ``<think>`` tags instead of swallowing them as HTML, and
    so that markup in a dataset row or an answer (``<img onerror=...>``) stays text in the notebook's HTML page."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: str) -> str:
    return _html_safe(text).replace("|", "\\|").replace("\n", "<br>") or "(empty)"


# ----------------------------------------------------------------------------------------------------------------
# One call per notebook cell (04 and 06)
# ----------------------------------------------------------------------------------------------------------------

def answer_heldout(cfg, run, model, tokenizer, out_path, max_new_tokens: int | None = None) -> list[dict]:
    """Generate answers to the run's held-out questions and save them as JSONL to ``out_path``.

    The questions are the first ``cfg.eval_questions`` held-out rows (all when ``None``; ``heldout_rows`` come
    first). ``max_new_tokens`` overrides ``cfg.max_new_tokens`` (use the same value in 04 and 06 to compare; 0 or
    None: the profile's).

    Raises:
        ConfigError: ``max_new_tokens`` is not a whole number >= 0 (04's and 06's MAX_NEW_TOKENS parameter).
    """
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 0):
        raise _config.ConfigError(f"MAX_NEW_TOKENS must be a whole number >= 0 (0: the profile's max_new_tokens, "
                                  f"{cfg.max_new_tokens}), got {max_new_tokens!r}.")
    _, heldout = _data.read_split(run)
    heldout = heldout[:cfg.eval_questions]
    answers = generate_answers(model, tokenizer, heldout, language=cfg.language,
                               max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                               batch_size=cfg.generation_batch_size)
    _data.write_jsonl(answers, out_path)
    return answers


def score_answers(cfg, run, answers: list[dict]) -> dict:
    """:func:`generation_metrics` of ``answers`` against the run's held-out reference responses.

    Raises:
        FileNotFoundError: notebook 03 has not run. KeyError: an answer is not to a held-out row of this run.
    """
    _, heldout = _data.read_split(run)
    return generation_metrics(answers, {r["row"]: r["Response"] for r in heldout}, cfg.language)


def heldout_loss(cfg, run, model, tokenizer) -> dict:
    """:func:`response_loss` on the run's held-out rows, truncated like training (``sft.max_length``)."""
    _, heldout = _data.read_split(run)
    return response_loss(model, tokenizer, heldout, language=cfg.language, batch_size=cfg.eval_batch_size,
                         max_length=cfg.sft.get("max_length"))


def show_answers(answers: list[dict], rows=None) -> str:
    """Markdown of the answers to the given dataset rows (default: all)."""
    keep = [a for a in answers if rows is None or a["row"] in set(rows)]
    return "\n\n".join(
        f"### Dataset row {a['row']}\n\n**Question.** {_html_safe(a['question'])}\n\n"
        f"**Answer** ({a['new_tokens']} tokens, {'stopped with EOS' if a['stopped'] else 'hit max_new_tokens'}):"
        f"\n\n{_html_safe(a['answer'])}" for a in keep
    )


_ROWS = [  # (label, key, always shown): the first four are always in the table, the rest when recorded
    ("response loss (nats/token, lower is better)", "loss", True),
    ("perplexity (lower is better)", "perplexity", True),
    ("mean answer length (tokens)", "mean_new_tokens", True),
    ("share stopped with EOS", "stopped_with_eos", True),
    ("ROUGE-L F1, answer after `</think>` vs reference Response", "rouge_l", False),
    ("mean answer length (characters after `</think>`)", "mean_answer_chars", False),
    ("share following the template (`<think>...</think>` then an answer)", "template_share", False),
]


def _diff(bv, fv) -> str:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (bv, fv))
    return f"{fv - bv:+.4g}" if ok else ""


def metrics_table(run) -> str:
    """Markdown table of every held-out and benchmark metric, baseline vs fine-tuned, with the difference.

    Rows: response loss, perplexity, answer length (tokens), share stopped with EOS (always); ROUGE-L, answer
    length in characters, share following the template (when recorded); per benchmark, the accuracy (with its
    mode, item count and chance level), the spread of its predicted letters, and, in generation mode, the
    unparseable answers (count and share). The difference is fine-tuned minus baseline. A note follows when 04 and 06
    did not measure the same thing (different question counts, benchmark items or modes), and a warning for each
    benchmark where one letter is most of the predictions
    (:func:`medtune.evaluation.multiple_choice.summarize`'s ``warning``).
    """
    m = run.metrics()
    b, f = m.get("baseline", {}), m.get("finetuned", {})
    lines = ["| held-out metric | baseline | fine-tuned | difference |", "|---|---:|---:|---:|"]
    for label, key, always in _ROWS:
        bv, fv = b.get(key), f.get(key)
        if always or bv is not None or fv is not None:
            lines.append(f"| {label} | {bv} | {fv} | {_diff(bv, fv)} |")
    bb, fb = b.get("benchmarks", {}), f.get("benchmarks", {})
    notes, warned = [], []
    if b.get("answers") is not None and f.get("answers") is not None and b["answers"] != f["answers"]:
        notes.append(f"held-out answers: {b['answers']} in 04, {f['answers']} in 06")
    for name in list(dict.fromkeys([*bb, *fb])):
        x, y = bb.get(name, {}), fb.get(name, {})
        ref = y or x
        lines.append(f"| {name}: accuracy ({ref.get('mode')}, {ref.get('items')} items; chance {ref.get('chance')}) | "
                     f"{x.get('accuracy')} | {y.get('accuracy')} | {_diff(x.get('accuracy'), y.get('accuracy'))} |")
        if x.get("predicted_spread") or y.get("predicted_spread"):
            lines.append(f"| {name}: predicted letters | {x.get('predicted_spread', '')} | "
                         f"{y.get('predicted_spread', '')} | |")
        warned += [f"**Warning, {stage} {name}:** {r['warning']}" for stage, r in (("baseline", x), ("fine-tuned", y))
                   if r.get("warning")]
        if "generate" in (x.get("mode"), y.get("mode")):
            lines.append(f"| {name}: unparseable answers (count, counted wrong) | {x.get('unparsed')} | "
                         f"{y.get('unparsed')} | {_diff(x.get('unparsed'), y.get('unparsed'))} |")
            lines.append(f"| {name}: unparseable share | {x.get('unparsed_share')} | {y.get('unparsed_share')} | "
                         f"{_diff(x.get('unparsed_share'), y.get('unparsed_share'))} |")
        if x and y and (x.get("items"), x.get("mode")) != (y.get("items"), y.get("mode")):
            notes.append(f"{name}: {x.get('items')} items by {x.get('mode')} in 04, "
                         f"{y.get('items')} by {y.get('mode')} in 06")
    if notes:
        lines += ["", "**Not the same measurement in 04 and 06** (compare with care): " + "; ".join(notes) + "."]
    if warned:
        lines += ["", *warned]
    return "\n".join(lines)


def plot_path(run):
    """``<run>/evaluation.png``: the figure of :func:`plot_comparison`."""
    return run.path / "evaluation.png"


def comparison_figure(run):
    """The :class:`matplotlib.figure.Figure` that :func:`plot_comparison` saves (no pyplot, no backend change).

    Left: the held-out generation shares in [0, 1] (ROUGE-L F1, share stopped with EOS, share following the
    template). Right (when benchmarks were run): accuracy per benchmark, with its chance level as a dashed line.
    Loss and perplexity are left to the table (one number each, different scales). Missing values are drawn as
    empty bars labelled "n/a".
    """
    from matplotlib.figure import Figure

    m = run.metrics()
    b, f = m.get("baseline", {}), m.get("finetuned", {})
    bench = list(dict.fromkeys([*b.get("benchmarks", {}), *f.get("benchmarks", {})]))
    fig = Figure(figsize=(11 if bench else 6, 3.6))
    axes = fig.subplots(1, 2 if bench else 1, squeeze=False)[0]
    width = 0.38

    def bars(ax, labels, base, tuned):
        xs = range(len(labels))
        for shift, values, name in ((-width / 2, base, "baseline (04)"), (width / 2, tuned, "fine-tuned (06)")):
            heights = [v if isinstance(v, (int, float)) else 0 for v in values]
            rects = ax.bar([x + shift for x in xs], heights, width, label=name)
            ax.bar_label(rects, labels=[f"{v:.2f}" if isinstance(v, (int, float)) else "n/a" for v in values],
                         fontsize=8, padding=2)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylim(0, 1.12)
        ax.grid(axis="y", alpha=0.3)

    keys = [("ROUGE-L F1", "rouge_l"), ("stopped with EOS", "stopped_with_eos"), ("follows template", "template_share")]
    bars(axes[0], [k[0] for k in keys], [b.get(k[1]) for k in keys], [f.get(k[1]) for k in keys])
    axes[0].set_title(f"held-out generation ({f.get('answers', b.get('answers'))} questions)")
    axes[0].set_ylabel("share / score (0-1)")
    axes[0].legend(fontsize=8, loc="upper left")
    if bench:
        ax = axes[1]
        bb, fb = b.get("benchmarks", {}), f.get("benchmarks", {})
        ref = {n: fb.get(n) or bb.get(n) for n in bench}
        labels = [f"{n}\n({ref[n]['items']} items, {ref[n]['mode']})" for n in bench]
        bars(ax, labels, [bb.get(n, {}).get("accuracy") for n in bench], [fb.get(n, {}).get("accuracy") for n in bench])
        for i, n in enumerate(bench):
            if ref[n].get("chance"):
                ax.hlines(ref[n]["chance"], i - 0.45, i + 0.45, colors="grey", linestyles="dashed",
                          label="chance" if i == 0 else None)
        ax.set_title("multiple-choice accuracy")
        ax.set_ylabel("accuracy (0-1)")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_comparison(run):
    """Save :func:`comparison_figure` (baseline vs fine-tuned bar charts) to :func:`plot_path` as PNG (120 dpi).

    Returns:
        The PNG's path, for ``IPython.display.Image(filename=...)``: the picture then shows the same live in
        JupyterLab and in the executed notebook, whatever matplotlib backend the kernel has.
    """
    path = plot_path(run)
    comparison_figure(run).savefig(path, dpi=120)
    return path
