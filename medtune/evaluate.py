"""Evaluation before (04) and after (06) fine-tuning, on the same held-out examples.

- :func:`generate_answers`: greedy answers to held-out questions with the test template (batched, left-padded).
- :func:`response_loss`: mean negative log-likelihood of the reference response (reasoning + answer + EOS)
  given the test prompt, and its perplexity ``exp(loss)`` (Jelinek et al. 1977; the usual LM definition).
"""

from __future__ import annotations

import math
import sys

import torch

from medtune import data as _data


def _device(model) -> torch.device:
    return next(p for p in model.parameters()).device


def _progress(iterable, total: int, desc: str):
    """A text progress bar that reads both live in JupyterLab and in the executed notebook (no widgets)."""
    from tqdm.std import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stdout, mininterval=2.0, ascii=True)


@torch.no_grad()
def generate_answers(model, tokenizer, rows: list[dict], *, language: str = "en", max_new_tokens: int = 1200,
                     batch_size: int = 4) -> list[dict]:
    """Greedy answers to ``rows``' questions with the test template.

    Args:
        model: a causal LM (4-bit, optionally with a PEFT adapter).
        tokenizer: its tokenizer (pad token distinct from EOS).
        rows: held-out rows with ``Question`` (and ``row``, the dataset index).
        language: template language.
        max_new_tokens: generation budget per answer, in tokens (walkthrough: 1200).
        batch_size: questions per ``generate`` call.

    Returns:
        One dict per row: ``{"row", "question", "answer", "new_tokens", "stopped"}``; ``stopped`` is True when the
        model emitted EOS before ``max_new_tokens``; ``answer`` is the decoded text without special tokens.
    """
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[dict] = []
    try:
        batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        for batch in _progress(batches, len(batches), "generating"):
            prompts = [_data.test_prompt(r["Question"], language) for r in batch]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(_device(model))
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            for r, ids in zip(batch, new):
                ids = ids.tolist()
                stopped = tokenizer.eos_token_id in ids
                n = ids.index(tokenizer.eos_token_id) + 1 if stopped else len([t for t in ids if t != tokenizer.pad_token_id])
                out.append({"row": r.get("row"), "question": r["Question"],
                            "answer": tokenizer.decode(ids[:n], skip_special_tokens=True).strip(),
                            "new_tokens": n, "stopped": stopped})
    finally:
        tokenizer.padding_side = side
    return out


@torch.no_grad()
def response_loss(model, tokenizer, rows: list[dict], *, language: str = "en", batch_size: int = 4,
                  max_length: int | None = None) -> dict:
    """Held-out loss and perplexity on the response part (reasoning + answer + EOS) given the test prompt.

    The prompt is tokenized alone and with the completion; the completion starts where the two token sequences
    diverge (as TRL does), and only those tokens are scored.

    Args:
        rows: held-out rows with ``Question``, ``Complex_CoT``, ``Response``.
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
            start = next((i for i, (a, b) in enumerate(zip(p_ids, full)) if a != b), min(len(p_ids), len(full)))
            labels = [-100] * start + full[start:]
            if max_length:
                full, labels = full[:max_length], labels[:max_length]
            seqs.append((full, labels))
        batches = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
        for batch in _progress(batches, len(batches), "held-out loss"):
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
            nll_sum += torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
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


def side_by_side(baseline: list[dict], finetuned: list[dict]) -> str:
    """Markdown with each held-out question, the un-tuned answer and the fine-tuned answer."""
    by_row = {a["row"]: a for a in finetuned}
    parts = []
    for b in baseline:
        f = by_row.get(b["row"], {"answer": "(missing)"})
        parts.append(
            f"### Dataset row {b['row']}\n\n**Question.** {b['question']}\n\n"
            f"| baseline (un-tuned) | fine-tuned (LoRA) |\n|---|---|\n"
            f"| {_cell(b['answer'])} | {_cell(f['answer'])} |\n"
        )
    return "\n".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


# ----------------------------------------------------------------------------------------------------------------
# One call per notebook cell (04 and 06)
# ----------------------------------------------------------------------------------------------------------------

def answer_heldout(cfg, run, model, tokenizer, out_path, max_new_tokens: int | None = None) -> list[dict]:
    """Generate answers to the run's held-out questions and save them as JSONL to ``out_path``.

    ``max_new_tokens`` overrides ``cfg.max_new_tokens`` (use the same value in 04 and 06 to compare).
    """
    _, heldout = _data.read_split(run)
    answers = generate_answers(model, tokenizer, heldout, language=cfg.language,
                               max_new_tokens=max_new_tokens or cfg.max_new_tokens, batch_size=cfg.generation_batch_size)
    _data.write_jsonl(answers, out_path)
    return answers


def heldout_loss(cfg, run, model, tokenizer) -> dict:
    """:func:`response_loss` on the run's held-out rows, truncated like training (``sft.max_length``)."""
    _, heldout = _data.read_split(run)
    return response_loss(model, tokenizer, heldout, language=cfg.language, batch_size=cfg.eval_batch_size,
                         max_length=cfg.sft.get("max_length"))


def show_answers(answers: list[dict], rows=None) -> str:
    """Markdown of the answers to the given dataset rows (default: all)."""
    keep = [a for a in answers if rows is None or a["row"] in set(rows)]
    return "\n\n".join(
        f"### Dataset row {a['row']}\n\n**Question.** {a['question']}\n\n**Answer** ({a['new_tokens']} tokens, "
        f"{'stopped with EOS' if a['stopped'] else 'hit max_new_tokens'}):\n\n{a['answer']}" for a in keep
    )


def metrics_table(run) -> str:
    """Markdown table of the held-out metrics, baseline vs fine-tuned, with the difference."""
    m = run.metrics()
    b, f = m.get("baseline", {}), m.get("finetuned", {})
    rows = [("response loss (nats/token, lower is better)", "loss"), ("perplexity (lower is better)", "perplexity"),
            ("mean answer length (tokens)", "mean_new_tokens"), ("share stopped with EOS", "stopped_with_eos")]
    lines = ["| held-out metric | baseline | fine-tuned | difference |", "|---|---:|---:|---:|"]
    for label, key in rows:
        bv, fv = b.get(key), f.get(key)
        diff = f"{fv - bv:+.4g}" if isinstance(bv, (int, float)) and isinstance(fv, (int, float)) else ""
        lines.append(f"| {label} | {bv} | {fv} | {diff} |")
    return "\n".join(lines)
