"""medtune.evaluation.heldout with a tiny randomly initialised Llama (hidden 16, one layer, the real Llama 4 vocabulary)
and the real Llama 4 tokenizer: response loss against an independent computation, batched vs unbatched greedy
generation, and the tables the notebooks show."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medtune.evaluation import heldout as E
from medtune.settings import config as C
from medtune.settings.runs import RunDir
from medtune.stages import data as D

PARAMS = Path(__file__).resolve().parents[2] / "params"

ROWS = [  # three lengths, so batches of 2 pad
    {"row": 0, "Question": "Which nerve is injured in wrist drop?",
     "Complex_CoT": "Wrist drop means the wrist extensors are weak. They are supplied by the radial nerve.",
     "Response": "The radial nerve."},
    {"row": 10, "Question": "A 6-year-old has a honey-coloured crusted rash around the mouth. What is the likely "
                            "diagnosis and the usual first-line treatment for a small, localised area?",
     "Complex_CoT": "Honey-coloured crusts around the nose and mouth in a child are the classic picture of "
                    "impetigo. Staphylococcus aureus is the usual cause, sometimes Streptococcus pyogenes. "
                    "A small localised area is treated topically, for example with mupirocin, rather than "
                    "with oral antibiotics.",
     "Response": "Non-bullous impetigo; topical mupirocin for a small localised area."},
    {"row": 3, "Question": "Antidote for heparin?",
     "Complex_CoT": "Heparin is reversed by a positively charged protein.",
     "Response": "Protamine sulfate."},
]


@pytest.fixture(scope="module")
def tok(llama4_tokenizer):
    assert llama4_tokenizer.pad_token_id == 200018 and llama4_tokenizer.eos_token_id == 200008
    return llama4_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                       initializer_range=0.5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    m = LlamaForCausalLM(conf).float().eval()
    assert m.get_output_embeddings().weight.shape == (len(tok), 16)
    return m


@pytest.fixture(scope="module")
def loss_b2(model, tok) -> dict:
    """response_loss over ROWS in batches of 2 (computed once: each call scores ~300 positions x 201k vocab)."""
    side = tok.padding_side
    out = E.response_loss(model, tok, ROWS, batch_size=2)
    assert tok.padding_side == side  # restored
    return out


def reference_nll(model, tok, row, max_length=None) -> tuple[float, int]:
    """Sum of -log p(completion token | everything before it), one unpadded sequence, and the token count."""
    ex = D.train_example(row, tok.eos_token)
    prompt_ids = tok(ex["prompt"])["input_ids"]
    full = tok(ex["prompt"] + ex["completion"])["input_ids"]
    assert full[:len(prompt_ids)] == prompt_ids
    start = len(prompt_ids)
    if max_length:
        full = full[:max_length]
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    total, n = 0.0, 0
    for pos in range(start, len(full)):  # token at pos is predicted from position pos - 1
        total -= logp[pos - 1, full[pos]].item()
        n += 1
    return total, n


# ---------------------------------------------------------------------------------------------------------------
# Response loss
# ---------------------------------------------------------------------------------------------------------------

def test_response_loss_equals_hand_computation(model, tok, loss_b2):
    parts = [reference_nll(model, tok, r) for r in ROWS]
    nll, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
    assert len({p[1] for p in parts}) == 3  # three different lengths: batch of 2 is padded
    out = loss_b2
    assert out["examples"] == 3
    assert out["tokens"] == n
    assert out["loss"] == pytest.approx(nll / n, abs=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / n), rel=2e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=2e-5)
    # the completion is scored, the prompt is not: the count is the completion's tokens, EOS included
    completion_tokens = [len(tok(D.train_example(r, tok.eos_token)["completion"], add_special_tokens=False)
                             ["input_ids"]) for r in ROWS]
    assert out["tokens"] == sum(completion_tokens)


def test_response_loss_max_length_truncates(model, tok, loss_b2):
    full = loss_b2
    prompt_lens = [len(tok(D.test_prompt(r["Question"]))["input_ids"]) for r in ROWS]
    max_length = min(prompt_lens) + 6  # the shortest prompt keeps 6 completion tokens; longer ones fewer
    cut = E.response_loss(model, tok, ROWS, batch_size=2, max_length=max_length)
    parts = [reference_nll(model, tok, r, max_length=max_length) for r in ROWS]
    expected_tokens = sum(p[1] for p in parts)
    assert cut["tokens"] == expected_tokens == sum(max(0, max_length - p) for p in prompt_lens)
    assert cut["tokens"] < full["tokens"]
    assert cut["loss"] == pytest.approx(sum(p[0] for p in parts) / expected_tokens, abs=1e-5)


def test_response_loss_zh_template_scores_the_same_completion(model, tok):
    en = E.response_loss(model, tok, ROWS[:1], batch_size=1)
    zh = E.response_loss(model, tok, ROWS[:1], batch_size=1, language="zh")
    assert zh["tokens"] == en["tokens"]  # same completion, different prompt
    assert zh["loss"] != en["loss"]


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------

def greedy(model, tok, question: str, steps: int) -> list[int]:
    ids = tok(D.test_prompt(question), return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


def test_generate_answers_batched(model, tok):
    side = tok.padding_side
    answers = E.generate_answers(model, tok, ROWS, max_new_tokens=5, batch_size=2)
    assert tok.padding_side == side
    assert [a["row"] for a in answers] == [0, 10, 3]
    for a, r in zip(answers, ROWS, strict=True):
        assert set(a) == {"row", "question", "answer", "new_tokens", "stopped"}
        assert a["question"] == r["Question"]
        assert 1 <= a["new_tokens"] <= 5
        ref = greedy(model, tok, r["Question"], 5)
        assert a["stopped"] == (tok.eos_token_id in ref)
        if not a["stopped"]:
            assert a["new_tokens"] == 5
        assert a["answer"] == tok.decode(ref, skip_special_tokens=True).strip()


def test_generate_batched_equals_unbatched(model, tok):
    batched = E.generate_answers(model, tok, ROWS, max_new_tokens=5, batch_size=2)
    single = E.generate_answers(model, tok, ROWS, max_new_tokens=5, batch_size=1)
    assert batched == single


def test_generate_stops_at_eos(model, tok):
    """An LM head that always prefers EOS: every answer stops after one token, empty text."""
    def prefer_eos(module, args, logits):
        logits = logits.clone()
        logits[..., tok.eos_token_id] += 1e4
        return logits

    hook = model.get_output_embeddings().register_forward_hook(prefer_eos)
    try:
        answers = E.generate_answers(model, tok, ROWS, max_new_tokens=5, batch_size=2)
    finally:
        hook.remove()
    assert [a["stopped"] for a in answers] == [True, True, True]
    assert [a["new_tokens"] for a in answers] == [1, 1, 1]
    assert [a["answer"] for a in answers] == ["", "", ""]
    assert E.summarize(answers) == {"answers": 3, "mean_new_tokens": 1.0, "stopped_with_eos": 1.0}


def test_answer_heldout_and_heldout_loss_use_the_run(model, tok, tmp_path, loss_b2):
    cfg = C.load(PARAMS / "smoke.yaml").replace(max_new_tokens=3, generation_batch_size=2, eval_batch_size=2)
    run = RunDir.create(cfg, root=tmp_path)
    D.write_jsonl([{"row": 1, **D.train_example(ROWS[0], tok.eos_token)}], run.train_data_path)
    D.write_jsonl(ROWS, run.heldout_path)
    answers = E.answer_heldout(cfg, run, model, tok, run.baseline_path)
    assert D.read_jsonl(run.baseline_path) == answers
    assert [a["row"] for a in answers] == [0, 10, 3]
    assert all(a["new_tokens"] <= 3 for a in answers)
    longer = E.answer_heldout(cfg, run, model, tok, run.finetuned_path, max_new_tokens=4)
    assert D.read_jsonl(run.finetuned_path) == longer
    for short, long in zip(answers, longer, strict=True):  # greedy: the 3-token answer is the start of the 4-token one
        assert long["new_tokens"] in (short["new_tokens"], short["new_tokens"] + 1)
        assert long["stopped"] or long["new_tokens"] == 4
    assert cfg.sft["max_length"] > 200  # longer than every ROWS sequence: nothing truncated
    assert E.heldout_loss(cfg, run, model, tok) == loss_b2


# ---------------------------------------------------------------------------------------------------------------
# Summaries and tables
# ---------------------------------------------------------------------------------------------------------------

def test_summarize_hand_computed():
    answers = [{"new_tokens": 10, "stopped": True}, {"new_tokens": 5, "stopped": False},
               {"new_tokens": 3, "stopped": True}]
    assert E.summarize(answers) == {"answers": 3, "mean_new_tokens": 6.0, "stopped_with_eos": 0.667}
    answers.append({"new_tokens": 1, "stopped": False})
    assert E.summarize(answers) == {"answers": 4, "mean_new_tokens": 4.8, "stopped_with_eos": 0.5}
    assert E.summarize([]) == {"answers": 0, "mean_new_tokens": None, "stopped_with_eos": None}


def test_metrics_table_differences(tmp_path):
    run = RunDir.create(C.load(PARAMS / "smoke.yaml"), root=tmp_path)
    run.record("baseline", {"loss": 2.0, "perplexity": 7.389, "mean_new_tokens": 100.0, "stopped_with_eos": 0.25})
    run.record("finetuned", {"loss": 1.5, "perplexity": 4.4817, "mean_new_tokens": 80.0, "stopped_with_eos": 1.0})
    lines = E.metrics_table(run).splitlines()
    assert lines[0] == "| held-out metric | baseline | fine-tuned | difference |"
    assert lines[2] == "| response loss (nats/token, lower is better) | 2.0 | 1.5 | -0.5 |"
    assert lines[3] == "| perplexity (lower is better) | 7.389 | 4.4817 | -2.907 |"
    assert lines[4] == "| mean answer length (tokens) | 100.0 | 80.0 | -20 |"
    assert lines[5] == "| share stopped with EOS | 0.25 | 1.0 | +0.75 |"
    assert len(lines) == 6


def test_metrics_table_before_finetuning(tmp_path):
    run = RunDir.create(C.load(PARAMS / "smoke.yaml"), root=tmp_path)
    run.record("baseline", {"loss": 2.0})
    lines = E.metrics_table(run).splitlines()
    assert lines[2] == "| response loss (nats/token, lower is better) | 2.0 | None |  |"


def test_side_by_side_and_show_answers():
    baseline = [{"row": 0, "question": "Q zero?", "answer": "a | b\nline two", "new_tokens": 5, "stopped": False},
                {"row": 10, "question": "Q ten?", "answer": "", "new_tokens": 1, "stopped": True}]
    finetuned = [{"row": 10, "question": "Q ten?", "answer": "Impetigo.", "new_tokens": 3, "stopped": True}]
    md = E.side_by_side(baseline, finetuned)
    assert "### Dataset row 0\n\n**Question.** Q zero?" in md
    assert "| a \\| b<br>line two<br><br>*(cut off: 5 tokens, max_new_tokens, no EOS)* | (missing) |" in md
    assert "| (empty) | Impetigo. |" in md
    assert md.index("Dataset row 0") < md.index("Dataset row 10")

    shown = E.show_answers(baseline + finetuned, rows=[0])
    assert "Dataset row 10" not in shown
    assert "**Answer** (5 tokens, hit max_new_tokens):\n\na | b\nline two" in shown
    everything = E.show_answers(finetuned)
    assert "(3 tokens, stopped with EOS)" in everything and "Impetigo." in everything


# ---------------------------------------------------------------------------------------------------------------
# Scores of generated answers (issue 4): ROUGE-L, template, answer length; the extended table and the plot
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, reference, language, p, r", [
    # LCS "the cat on the mat" = 5 of 6 tokens each way
    ("the cat on the mat today", "the cat sat on the mat", "en", 5 / 6, 5 / 6),
    # case and punctuation are not tokens: ref [the, radial, nerve], pred [radial, nerve, injury], LCS 2
    ("Radial nerve injury!", "The radial nerve.", "en", 2 / 3, 2 / 3),
    # order matters: LCS of [b, a] and [a, b] is 1
    ("b a", "a b", "en", 1 / 2, 1 / 2),
    # Chinese: one token per character; LCS "心肌梗死" = 4, prediction 4 characters, reference 6
    ("心肌梗死", "急性心肌梗死", "zh", 1.0, 4 / 6),
    ("", "anything", "en", 0.0, 0.0),
])
def test_rouge_l_hand_lcs_and_reference_package(prediction, reference, language, p, r):
    from rouge_score import rouge_scorer

    f1 = 2 * p * r / (p + r) if p + r else 0.0
    assert E.rouge_l(prediction, reference, language) == pytest.approx(f1)
    if language == "en":  # the package itself, called directly
        direct = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"]
        assert (direct.precision, direct.recall, direct.fmeasure) == pytest.approx((p, r, f1))


def test_rouge_l_zh_needs_character_tokens():
    from rouge_score import rouge_scorer

    # the package's default tokenizer drops Chinese entirely: that is why zh uses character tokens
    assert rouge_scorer.RougeScorer(["rougeL"]).score("急性心肌梗死", "心肌梗死")["rougeL"].fmeasure == 0.0
    assert E.rouge_l("心肌梗死", "急性心肌梗死", "zh") == pytest.approx(0.8)


@pytest.mark.parametrize("text, ok", [
    ("<think>\nWrist drop: radial nerve.\n</think>\nThe radial nerve.", True),
    ("  <think>r</think>a  ", True),
    ("<think>\n\n</think>\nThe radial nerve.", False),      # blank reasoning
    ("<think>\nreasoning\n</think>\n  ", False),            # blank answer
    ("<think>\nreasoning that never ends", False),          # no </think>
    ("The radial nerve.", False),                           # no think block
    ("Sure. <think>r</think>a", False),                     # does not start with it
    ("<think>r</think>a<think>s</think>b", False),          # two blocks
    ("<think>r</think>a</think>", False),                   # stray close tag
])
def test_follows_template(text, ok):
    assert E.follows_template(text) is ok


def test_generation_metrics_hand_computed():
    answers = [
        {"row": 0, "answer": "<think>\nwrist drop\n</think>\nThe radial nerve.", "new_tokens": 12, "stopped": True},
        {"row": 10, "answer": "<think>\nhoney crusts and then", "new_tokens": 20, "stopped": False},
        {"row": 3, "answer": "protamine", "new_tokens": 4, "stopped": True},
    ]
    refs = {0: "The radial nerve.", 10: "Impetigo; topical mupirocin.", 3: "Protamine sulfate."}
    out = E.generation_metrics(answers, refs)
    # ROUGE-L F1: 1.0 (identical answer part); 0.0 (no overlap); P=1, R=1/2 -> 2/3
    assert out["rouge_l"] == round((1.0 + 0.0 + 2 / 3) / 3, 4) == 0.5556
    # answer parts: "The radial nerve." (17), "honey crusts and then" (21), "protamine" (9)
    assert out["mean_answer_chars"] == round((17 + 21 + 9) / 3, 1) == 15.7
    assert out["template_share"] == 0.333
    assert out == E.summarize(answers) | {"rouge_l": 0.5556, "mean_answer_chars": 15.7, "template_share": 0.333}
    with pytest.raises(KeyError):
        E.generation_metrics(answers, {0: "x"})
    assert E.generation_metrics([], {}) == {"answers": 0, "mean_new_tokens": None, "stopped_with_eos": None,
                                            "rouge_l": None, "mean_answer_chars": None, "template_share": None}


def test_eval_questions_and_score_answers_use_the_run(model, tok, tmp_path):
    cfg = C.load(PARAMS / "smoke.yaml").replace(max_new_tokens=2, generation_batch_size=2, eval_questions=2)
    run = RunDir.create(cfg, root=tmp_path)
    D.write_jsonl([{"row": 1, **D.train_example(ROWS[0], tok.eos_token)}], run.train_data_path)
    D.write_jsonl(ROWS, run.heldout_path)
    answers = E.answer_heldout(cfg, run, model, tok, run.baseline_path)
    assert [a["row"] for a in answers] == [0, 10]  # the first eval_questions held-out rows
    scores = E.score_answers(cfg, run, answers)
    refs = {r["row"]: r["Response"] for r in ROWS}
    assert scores == E.generation_metrics(answers, refs)
    assert scores["answers"] == 2 and 0.0 <= scores["rouge_l"] <= 1.0


def test_metrics_table_every_metric(tmp_path):
    run = RunDir.create(C.load(PARAMS / "smoke.yaml"), root=tmp_path)
    bench = {"items": 8, "mode": "generate", "chance": 0.25}
    run.record("baseline", {"loss": 2.0, "perplexity": 7.389, "mean_new_tokens": 100.0, "stopped_with_eos": 0.25,
                            "rouge_l": 0.1, "mean_answer_chars": 300.0, "template_share": 0.0, "answers": 8,
                            "benchmarks": {"medqa": {**bench, "accuracy": 0.25, "unparsed": 4, "unparsed_share": 0.5},
                                           "pubmedqa": {"items": 8, "mode": "loglik", "chance": 0.3333,
                                                        "accuracy": 0.375, "unparsed": 0}}})
    run.record("finetuned", {"loss": 1.5, "perplexity": 4.4817, "mean_new_tokens": 80.0, "stopped_with_eos": 1.0,
                             "rouge_l": 0.25, "mean_answer_chars": 250.0, "template_share": 0.875, "answers": 8,
                             "benchmarks": {"medqa": {**bench, "accuracy": 0.5, "unparsed": 1, "unparsed_share": 0.125},
                                            "pubmedqa": {"items": 8, "mode": "loglik", "chance": 0.3333,
                                                         "accuracy": 0.5, "unparsed": 0}}})
    lines = E.metrics_table(run).splitlines()
    assert lines[2:6] == [
        "| response loss (nats/token, lower is better) | 2.0 | 1.5 | -0.5 |",
        "| perplexity (lower is better) | 7.389 | 4.4817 | -2.907 |",
        "| mean answer length (tokens) | 100.0 | 80.0 | -20 |",
        "| share stopped with EOS | 0.25 | 1.0 | +0.75 |",
    ]
    assert lines[6:] == [
        "| ROUGE-L F1, answer after `</think>` vs reference Response | 0.1 | 0.25 | +0.15 |",
        "| mean answer length (characters after `</think>`) | 300.0 | 250.0 | -50 |",
        "| share following the template (`<think>...</think>` then an answer) | 0.0 | 0.875 | +0.875 |",
        "| medqa: accuracy (generate, 8 items; chance 0.25) | 0.25 | 0.5 | +0.25 |",
        "| medqa: unparseable answers (count, counted wrong) | 4 | 1 | -3 |",
        "| medqa: unparseable share | 0.5 | 0.125 | -0.375 |",
        "| pubmedqa: accuracy (loglik, 8 items; chance 0.3333) | 0.375 | 0.5 | +0.125 |",
    ]
    # 04 and 06 measured different things: the table says so
    run.record("finetuned", {"answers": 4, "benchmarks": {"medqa": {**bench, "items": 4, "accuracy": 0.5,
                                                                    "unparsed": 0, "unparsed_share": 0.0}}})
    note = E.metrics_table(run).splitlines()[-1]
    assert note.startswith("**Not the same measurement in 04 and 06**")
    assert "held-out answers: 8 in 04, 4 in 06" in note
    assert "medqa: 8 items by generate in 04, 4 by generate in 06" in note


def test_metrics_table_predicted_letters_and_one_letter_warning(tmp_path):
    """The spread of predicted letters sits beside the accuracy; a one-letter warning of either stage follows the
    table in plain words."""
    run = RunDir.create(C.load(PARAMS / "smoke.yaml"), root=tmp_path)
    warning = "D is 8 of 8 readable predictions (100%), but the right answer of only 2 of 8 items (25%). ..."
    run.record("baseline", {"benchmarks": {"medqa": {"items": 8, "mode": "loglik", "chance": 0.25, "accuracy": 0.25,
                                                     "predicted_spread": "A 0 · B 0 · C 0 · D 8", "warning": warning}}})
    run.record("finetuned", {"benchmarks": {"medqa": {"items": 8, "mode": "loglik", "chance": 0.25, "accuracy": 0.5,
                                                      "predicted_spread": "A 3 · B 2 · C 1 · D 2", "warning": None}}})
    lines = E.metrics_table(run).splitlines()
    i = lines.index("| medqa: accuracy (loglik, 8 items; chance 0.25) | 0.25 | 0.5 | +0.25 |")
    assert lines[i + 1] == "| medqa: predicted letters | A 0 · B 0 · C 0 · D 8 | A 3 · B 2 · C 1 · D 2 | |"
    assert lines[-2:] == ["", f"**Warning, baseline medqa:** {warning}"]


def test_plot_comparison_writes_png(tmp_path):
    run = RunDir.create(C.load(PARAMS / "smoke.yaml"), root=tmp_path)
    run.record("baseline", {"rouge_l": 0.1, "stopped_with_eos": 0.25, "template_share": 0.0, "answers": 4,
                            "benchmarks": {"medqa": {"items": 8, "mode": "loglik", "chance": 0.25, "accuracy": 0.25}}})
    run.record("finetuned", {"rouge_l": 0.2, "stopped_with_eos": 1.0, "template_share": 0.5, "answers": 4,
                             "benchmarks": {"medqa": {"items": 8, "mode": "loglik", "chance": 0.25, "accuracy": 0.5}}})
    path = E.plot_comparison(run)
    assert path == E.plot_path(run) == run.path / "evaluation.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    fig = E.comparison_figure(run)
    assert len(fig.axes) == 2
    assert [round(p.get_height(), 3) for p in fig.axes[0].patches] == [0.1, 0.25, 0.0, 0.2, 1.0, 0.5]
    assert [round(p.get_height(), 3) for p in fig.axes[1].patches] == [0.25, 0.5]  # accuracy: baseline, fine-tuned
    run2 = RunDir.create(C.load(PARAMS / "smoke.yaml"), root=tmp_path)
    run2.record("baseline", {"rouge_l": 0.1})
    assert len(E.comparison_figure(run2).axes) == 1  # no benchmarks: one panel; missing values drawn as n/a
    assert E.plot_comparison(run2).is_file()


def test_answers_markdown_shows_think_tags():
    """Markdown would swallow <think> as an HTML tag: the answers are escaped, in both views."""
    a = [{"row": 0, "question": "Q?", "answer": "<think>\nr & s\n</think>\nA", "new_tokens": 5, "stopped": True}]
    assert "&lt;think&gt;\nr &amp; s\n&lt;/think&gt;\nA" in E.show_answers(a)
    assert "| &lt;think&gt;<br>r &amp; s<br>&lt;/think&gt;<br>A | &lt;think&gt;" in E.side_by_side(a, a)


@pytest.mark.parametrize("bad", [-5, 2.5, "24", True])
def test_max_new_tokens_parameter_is_checked_before_generating(bad):
    """04/06's MAX_NEW_TOKENS reaches answer_heldout unchecked by the profile; -5 used to fail inside transformers."""
    from medtune.evaluation import heldout as E
    from medtune.settings import config as C

    cfg = C.load(Path(__file__).resolve().parents[2] / "params" / "smoke.yaml")
    with pytest.raises(C.ConfigError,
                       match=r"MAX_NEW_TOKENS must be a whole number >= 0 \(0: the profile's max_new_tokens, 24\)"):
        E.answer_heldout(cfg, run=None, model=None, tokenizer=None, out_path=None, max_new_tokens=bad)


def test_markup_in_questions_and_answers_stays_text():
    """A dataset row or an answer holding HTML must not become markup in 04/06 (nor in their exported HTML pages,
    which nbconvert copies Markdown's raw HTML into): it is escaped."""
    hostile = '<img src=x onerror="alert(2)"><script>alert(1)</script>'
    rows = [{"row": 0, "question": "Q " + hostile, "answer": "A " + hostile, "new_tokens": 5, "stopped": True}]
    escaped = "&lt;img src=x onerror=\"alert(2)\"&gt;&lt;script&gt;alert(1)&lt;/script&gt;"
    for md in (E.show_answers(rows), E.side_by_side(rows, rows)):
        assert "<img" not in md and "<script" not in md
        assert f"**Question.** Q {escaped}" in md and f"A {escaped}" in md
