"""Write notebooks/NN_*.ipynb from the cell lists below (python scripts/make_notebooks.py).

The notebooks are the source users open and edit in JupyterLab; this script only keeps their shared shape
(title, imports, one `parameters` cell, numbered sections, a last cell that records) consistent when many change.
"""

import hashlib
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

PARAMS = (
    'PARAMS: str = "../params/default.yaml"  # profile YAML; used when a new run is created\n'
    'RUN_DIR: str = ""  # outputs/<run-id> to work in; empty: {empty}'
)
LATEST = "the latest run under outputs/"
# Parameters of 04 and 06 (evaluation). None keeps the profile's value; give 04 and 06 the same values.
EVAL_PARAMS = (
    "\nMAX_NEW_TOKENS: int = 0  # tokens per answer; 0: {which}"
    "\nEVAL_QUESTIONS: int | None = None  # held-out questions answered; None: the profile's eval_questions"
    "\nBENCHMARK_LIMIT: int | None = None  # items per benchmark; None: the profile's benchmark_limit"
    '\nBENCHMARK_MODE: str | None = None  # "loglik" or "generate"; None: the profile\'s benchmark_mode'
)
SCORES_MD = (
    "Each answer's part after `</think>` (the whole text when there is none) against the dataset's `Response`: "
    "ROUGE-L F1 (the `rouge-score` package), its length in characters; the share of answers that stopped with EOS "
    "before `max_new_tokens`; the share that follows the template: it starts with `<think>`, has exactly one "
    "`<think>` and one `</think>`, non-blank reasoning between them and a non-blank answer after."
)
BENCH_MD = (
    "`loglik`: each option letter scored by its log-likelihood after the question, the options and "
    "`The answer is` (no reasoning); the highest wins. `generate`: a free answer, the letter read by a fixed rule "
    "(the last \"answer is X\" / \"Answer: X\" / \"答案是X\"; else a lone letter at the start; never a letter of "
    "an echoed option list); unreadable answers count as wrong and are reported. Per-item predictions go to the "
    "run's `benchmarks/` folder."
)

HARNESS_MD = (
    "With `benchmark_harness: true` in the profile, lm-evaluation-harness (`lm-eval`) scores the same items on this "
    "same model, offline: with medtune's own prompt (its log-likelihoods must equal medtune's: a check of the "
    "scoring) and with its own MedQA / PubMedQA / MedMCQA task prompt (the accuracy comparable with figures published "
    "from lm-eval)."
)

def nb(title: str, line: str, imports: str, params: str, cells: list) -> nbformat.NotebookNode:
    out = [new_markdown_cell(f"# {title}\n\n{line}"), new_code_cell(imports)]
    out.append(new_code_cell(params, metadata={"tags": ["parameters"]}))
    for kind, text in cells:
        out.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    for i, cell in enumerate(out):  # stable ids: regenerating an unchanged notebook changes nothing in git
        cell.id = hashlib.sha1(f"{title}|{i}".encode()).hexdigest()[:8]
    book = new_notebook(cells=out)
    # the project's kernel (`make kernel`, `make lab`: medtune.lab); headless runs give papermill `python3` instead
    book.metadata["kernelspec"] = {"name": "medtune", "display_name": "medtune", "language": "python"}
    book.metadata["language_info"] = {"name": "python"}
    return book


NOTEBOOKS = {
    "00_authenticate": nb(
        "00 · Authenticate: access to the model and the data",
        "Checks, before any download, that this run can read what it needs from its source: the Hugging Face Hub, a "
        "Hub mirror (`hub_endpoint`, e.g. hf-mirror.com) or ModelScope (`source: modelscope`). Tokens come from "
        "`HF_TOKEN` / `MODELSCOPE_API_TOKEN` in the environment and are never typed, printed or written. This "
        "notebook starts a new run.",
        "from medtune.settings import runs\nfrom medtune.stages import auth, preflight",
        PARAMS.format(empty="start a new run"),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR, new_run=True)"),
            ("md", "## 1. Token, access to the gated model, and the download size\n\nLlama 4 Scout is gated on the "
                   "Hub: accept its license on its page first (the same token then works through a mirror). On the "
                   "offline default profile the model and data are local and nothing is contacted."),
            ("code", "status = auth.check_access(cfg)\nauth.show(status)"),
            ("code", "# preflight: settings vs. this machine, the rows read and split as 03 will (token lengths with "
                     "the\n# model's tokenizer), memory, disk, versions; all failures at once, before any download\n"
                     "run.record(\"preflight\", preflight.run(cfg, access=status))"),
            ("md", "## Record"),
            ("code", 'run.record("auth", status);'),
        ],
    ),
    "01_load_quantized_model": nb(
        "01 · Load the model in 4-bit (QLoRA's NF4)",
        "The walkthrough's `BitsAndBytesConfig` (4-bit NF4, no double quantization, bf16 compute; the CPU profiles "
        "compute in float32) with "
        "`device_map=\"auto\"`, the matching tokenizer, and a report of what was quantized and what was not.",
        "from medtune.settings import config, runs\nfrom medtune.stages import modeling, preflight",
        PARAMS.format(empty=LATEST),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)"),
            ("md", "## 1. Preflight\n\nBefore the download (Scout: ~218 GB) and the load: precision and 4-bit support "
                   "on this machine, the token and the gated access, the training memory estimated from the model's "
                   "config against free GPU memory, the disk against the download's size from the Hub's file metadata, "
                   "and the library versions against the tested set. Every failure is listed at once, with its fix."),
            ("code", "checks = preflight.run(cfg, rows=False)  # 00 read, split and counted the rows"),
            ("md", "## 2. Quantization config"),
            ("code", "config.bnb_config(cfg)"),
            ("md", "## 3. Load model and tokenizer\n\nThe tokenizer's padding token must differ from its EOS, or the "
                   "model never learns to stop."),
            ("code", "model, tokenizer = modeling.load_model(cfg)\n"
                     "print(f\"eos={tokenizer.eos_token!r} pad={tokenizer.pad_token!r}\")"),
            ("md", "## 4. What was quantized, and the memory it takes"),
            ("code", "report = modeling.quantization_report(model)\nmodeling.show_quantization(report)"),
            ("md", "## Record"),
            ("code", 'run.record("preflight", checks)\nrun.record("load", report);'),
        ],
    ),
    "02_check_gpu": nb(
        "02 · Check the GPU",
        "`nvidia-smi` as the walkthrough shows it, and per device: total, used and free memory, and the headroom left "
        "for training once the 4-bit model (size from 01) is loaded. Without a GPU it says so and shows CPU memory.",
        "from medtune.settings import runs\nfrom medtune.stages import hardware",
        PARAMS.format(empty=LATEST),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)"),
            ("md", "## 1. nvidia-smi"),
            ("code", 'print(hardware.nvidia_smi() or "nvidia-smi: no NVIDIA driver here; the run uses the CPU.")'),
            ("md", "## 2. Memory per device (GiB)"),
            ("code", 'rows = hardware.memory_table(model_gib=run.metrics().get("load", {}).get("footprint_gib", 0.0))\n'
                     "hardware.show(rows)"),
            ("md", "## Record"),
            ("code", 'run.record("gpu", {"devices": rows});'),
        ],
    ),
    "03_format_prompts": nb(
        "03 · Format the prompts",
        "The walkthrough's training template (task, clinical-expert role, `### Question`, `### Response` with the "
        "reasoning in `<think>` and the answer) in the profile's `language` (en or zh), the tokenizer's EOS appended, "
        "and a held-out split saved to the run that is never trained on.",
        "from medtune.settings import runs\nfrom medtune.stages import data, modeling",
        PARAMS.format(empty=LATEST),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)"),
            ("md", "## 1. Tokenizer (for its EOS token)"),
            ("code", "tokenizer = modeling.load_tokenizer(modeling.resolve_model(cfg), cfg.model_revision)\n"
                     "print(f\"eos={tokenizer.eos_token!r} pad={tokenizer.pad_token!r}\")"),
            ("md", "## 2. Read, split and format\n\nRows listed in `heldout_rows` (the walkthrough's questions 0 and "
                   "10) and a seeded sample up to `heldout_size` are held out."),
            ("code", "summary = data.prepare(cfg, run, tokenizer)\n"
                     "print({k: v for k, v in summary.items() if k != \"first_text\"})"),
            ("md", "## 3. The first formatted training example"),
            ("code", 'print(summary["first_text"])'),
            ("md", "## 4. The test template (what 04 and 06 send)"),
            ("code", 'print(data.test_prompt("<question>", cfg.language))'),
            ("md", "## Record"),
            ("code", 'run.record("data", {k: v for k, v in summary.items() if k != "first_text"} '
                     '| {"language": cfg.language});'),
        ],
    ),
    "04_baseline": nb(
        "04 · Baseline: the un-tuned model on held-out questions",
        "Numbers before training, on the same held-out data that 06 uses after it: answers to the held-out questions "
        "scored against the reference responses (ROUGE-L, length, EOS, template), the held-out loss and perplexity, "
        "and multiple-choice accuracy on the profile's benchmarks (MedQA, PubMedQA).",
        "from IPython.display import Markdown, display\n\nfrom medtune.evaluation import harness, heldout, "
        "multiple_choice\n"
        "from medtune.settings import runs\nfrom medtune.stages import modeling",
        PARAMS.format(empty=LATEST) + EVAL_PARAMS.format(which="the profile's (walkthrough: 1200)"),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR, max_new_tokens=MAX_NEW_TOKENS or None, "
                     "eval_questions=EVAL_QUESTIONS, benchmark_limit=BENCHMARK_LIMIT, benchmark_mode=BENCHMARK_MODE)\n"
                     "model, tokenizer = modeling.load_model(cfg)"),
            ("md", "## 1. Answers to the held-out questions"),
            ("code", "answers = heldout.answer_heldout(cfg, run, model, tokenizer, run.baseline_path)"),
            ("code", "display(Markdown(heldout.show_answers(answers, rows=cfg.heldout_rows)))"),
            ("md", "## 2. The answers against the reference responses\n\n" + SCORES_MD),
            ("code", "scores = heldout.score_answers(cfg, run, answers)\nscores"),
            ("md", "## 3. Held-out loss and perplexity (response tokens)"),
            ("code", "loss = heldout.heldout_loss(cfg, run, model, tokenizer)\nloss"),
            ("md", "## 4. Multiple-choice benchmarks\n\n" + BENCH_MD),
            ("code", 'bench = multiple_choice.measure(cfg, run, model, tokenizer, "baseline")\n'
                     "display(Markdown(multiple_choice.show(bench)))"),
            ("md", "## 5. Cross-check with lm-evaluation-harness\n\n" + HARNESS_MD),
            ("code", 'bench = harness.cross_check(cfg, run, model, tokenizer, "baseline", bench)\n'
                     "display(Markdown(harness.show(bench)))"),
            ("md", "## Record"),
            ("code", 'run.record("baseline", loss | scores | {"benchmarks": bench});'),
        ],
    ),
    "05_train_lora": nb(
        "05 · LoRA SFT",
        "LoRA (r=64, alpha=16, dropout 0.05 on q/k/v/o/gate/up/down_proj) on the 4-bit model, trained with TRL's "
        "`SFTTrainer` and the walkthrough's arguments. Checkpoints go into the run; re-running resumes from the last.",
        "from IPython.display import Image, display\n\nfrom medtune.settings import config, runs\n"
        "from medtune.stages import distributed, train",
        PARAMS.format(empty=LATEST),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)"),
            ("md", "## 1. LoRA and SFT configuration"),
            ("code", "config.lora_config(cfg)"),
            ("md", "## 2. Train\n\nLoads the 4-bit model, puts LoRA on it and trains with `SFTTrainer`: in this "
                   "kernel, or with `num_processes: N` in N data-parallel processes (`accelerate launch`, one per "
                   "GPU; their output appears below as it comes; docs/multi-gpu.md)."),
            ("code", "result = distributed.fit(cfg, run)\nresult"),
            ("md", "## 3. Loss curve"),
            ("code", "display(Image(filename=train.loss_curve(run)))"),
            ("md", "## Record"),
            ("code", 'run.record("train", result);'),
        ],
    ),
    "06_evaluate_finetuned": nb(
        "06 · Evaluate the fine-tuned model",
        "The same held-out questions, reference responses and benchmark items as 04, with the LoRA adapter from 05: "
        "every metric baseline against fine-tuned, with plots, the HuatuoGPT-o1 paper's figures for context, and "
        "the answers side by side.",
        "from IPython.display import Image, Markdown, display\n\nfrom medtune.evaluation import harness, heldout, "
        "multiple_choice\nfrom medtune.settings import runs\nfrom medtune.stages import data, modeling",
        PARAMS.format(empty=LATEST) + EVAL_PARAMS.format(which="the profile's (use 04's values)"),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR, max_new_tokens=MAX_NEW_TOKENS or None, "
                     "eval_questions=EVAL_QUESTIONS, benchmark_limit=BENCHMARK_LIMIT, benchmark_mode=BENCHMARK_MODE)\n"
                     "model, tokenizer = modeling.load_model(cfg, adapter=run.adapter_dir)"),
            ("md", "## 1. Answers with the adapter"),
            ("code", "answers = heldout.answer_heldout(cfg, run, model, tokenizer, run.finetuned_path)"),
            ("md", "## 2. The answers against the reference responses\n\n" + SCORES_MD),
            ("code", "scores = heldout.score_answers(cfg, run, answers)\nscores"),
            ("md", "## 3. Held-out loss and perplexity"),
            ("code", "loss = heldout.heldout_loss(cfg, run, model, tokenizer)\nloss"),
            ("md", "## 4. Multiple-choice benchmarks\n\n" + BENCH_MD),
            ("code", 'bench = multiple_choice.measure(cfg, run, model, tokenizer, "finetuned")\n'
                     "display(Markdown(multiple_choice.show(bench)))"),
            ("code", 'bench = harness.cross_check(cfg, run, model, tokenizer, "finetuned", bench)\n'
                     "display(Markdown(harness.show(bench)))"),
            ("code", 'run.record("finetuned", loss | scores | {"benchmarks": bench, '
                     '"paper_anchor": multiple_choice.PAPER_ANCHOR});'),
            ("md", "## 5. Baseline vs fine-tuned\n\nEvery metric of 04 and 06; the difference is fine-tuned minus "
                   "baseline."),
            ("code", "display(Markdown(heldout.metrics_table(run)))"),
            ("code", "display(Image(filename=heldout.plot_comparison(run)))"),
            ("md", "## 6. For context: the HuatuoGPT-o1 paper\n\nThe paper that built the dataset fine-tuned "
                   "Llama-3.1-8B-Instruct on it. A different, larger model, trained on all of it and evaluated by "
                   "generation on the full test sets: its figures are context for this run's, not a target."),
            ("code", "display(Markdown(multiple_choice.anchor_table(run)))"),
            ("md", "## 7. The answers side by side"),
            ("code", "display(Markdown(heldout.side_by_side(data.read_jsonl(run.baseline_path), answers)))"),
            ("md", "## Record\n\nEverything above is in the run's `metrics.json` (sections `baseline` and "
                   "`finetuned`); per-item benchmark predictions are in the run's `benchmarks/`, the figure in "
                   "`evaluation.png`."),
            ("code", 'print(f"metrics: {run.metrics_path}")'),
        ],
    ),
    "07_push": nb(
        "07 · Push the adapter, with its model card",
        "The adapter, its tokenizer and a model card written from this run, to the Hugging Face Hub or ModelScope "
        "(private by default). The default is a dry run: it writes exactly the folder that would be uploaded, `push/` "
        "in the run. Optionally, the LoRA merged into the bf16 base weights as a standalone model.",
        "from IPython.display import Markdown, display\n\nfrom medtune.settings import runs\n"
        "from medtune.stages import publish",
        PARAMS.format(empty=LATEST)
        + "\nPUSH: bool | None = None  # True uploads, False writes the folder only (dry run); None: the profile's push"
        + '\nPUSH_TO: str = ""  # "hub" (HF_TOKEN) or "modelscope" (MODELSCOPE_API_TOKEN); empty: the profile\'s '
          'push_to'
        + '\nREPO_ID: str = ""  # e.g. "you/llama4-scout-medical-qlora"; empty: the profile\'s hub_repo_id'
        + "\nEXPORT_MERGED: bool | None = None  # also save the LoRA merged into the bf16 base; None: the profile's",
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR, push=PUSH, push_to=PUSH_TO or None,\n"
                     "                        hub_repo_id=REPO_ID or None, export_merged=EXPORT_MERGED)"),
            ("md", "## 1. The folder to upload\n\nThe adapter and tokenizer from 05 (no checkpoints or optimizer "
                   "states) and a generated model card."),
            ("code", "files = publish.build_folder(cfg, run)\npublish.list_folder(run)"),
            ("md", "## 2. The model card, as the Hub shows it\n\nMetadata (base model, license, dataset), how it was "
                   "trained, the evaluation of 04 and 06, the prompt template and a usage snippet."),
            ("code", "display(Markdown(publish.card(run)))"),
            ("md", "## 3. Push, or dry run\n\nWith `PUSH = True` the same folder is uploaded to `REPO_ID` (created "
                   "private). The token is read from the environment."),
            ("code", "result = publish.push(cfg, run)\nresult"),
            ("md", "## 4. Merged model (optional)\n\nThe LoRA merged into the base loaded in bf16 (never into the "
                   "4-bit weights, which would round the update away), saved in the standard layout. The disk and "
                   "memory it needs are printed first; with `EXPORT_MERGED` off, only that is shown."),
            ("code", "merged = publish.export_merged(cfg, run)"),
            ("md", "## Record"),
            ("code", 'run.record("push", result | {"merged": merged});'),
        ],
    ),
}


RESOURCES_MD = (
    "## Resources per notebook\n\nWall time, peak GPU memory (`torch.cuda.max_memory_allocated`; - where CUDA "
    "was not used) and peak CPU RSS of each notebook's kernel, as recorded by its last cell in `metrics.json` "
    "(section `resources`)."
)


def with_resources(name: str, book: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Add, after the session cell, the rehearsal notice (shown only when the run is a rehearsal: random weights),
    and append the cell that records the notebook's wall time and peak memory; the last notebook also shows the
    table of every notebook's."""
    notice = new_code_cell("runs.show_rehearsal_notice(cfg);  # says so when the weights are random (rehearsal)")
    notice.id = hashlib.sha1(f"{name}|rehearsal".encode()).hexdigest()[:8]
    session = next(i for i, c in enumerate(book.cells) if "runs.session(" in c.source)
    book.cells.insert(session + 1, notice)
    cells = [new_code_cell(f'run.record_resources("{name}");')]
    if name == list(NOTEBOOKS)[-1]:
        cells = [new_markdown_cell(RESOURCES_MD),
                 new_code_cell(f'run.record_resources("{name}")\ndisplay(Markdown(run.resources_table()))')]
    for cell in cells:
        cell.id = hashlib.sha1(f"{name}|resources|{len(book.cells)}".encode()).hexdigest()[:8]
        book.cells.append(cell)
    return book


NOTEBOOKS = {name: with_resources(name, book) for name, book in NOTEBOOKS.items()}


if __name__ == "__main__":
    folder = Path(__file__).resolve().parents[1] / "notebooks"
    folder.mkdir(exist_ok=True)
    for name, book in NOTEBOOKS.items():
        nbformat.write(book, folder / f"{name}.ipynb")
        print("wrote", folder / f"{name}.ipynb")
