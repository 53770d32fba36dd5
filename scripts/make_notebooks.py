"""Write notebooks/NN_*.ipynb from the cell lists below (python scripts/make_notebooks.py).

The notebooks are the source users open and edit in JupyterLab; this script only keeps their shared shape
(title, imports, one `parameters` cell, numbered sections, a last cell that records) consistent when many change.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

PARAMS = (
    'PARAMS: str = "../params/default.yaml"  # profile YAML; used when a new run is created\n'
    'RUN_DIR: str = ""  # outputs/<run-id> to work in; empty: {empty}'
)
LATEST = "the latest run under outputs/"


def nb(title: str, line: str, imports: str, params: str, cells: list) -> nbformat.NotebookNode:
    out = [new_markdown_cell(f"# {title}\n\n{line}"), new_code_cell(imports)]
    out.append(new_code_cell(params, metadata={"tags": ["parameters"]}))
    for kind, text in cells:
        out.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    book = new_notebook(cells=out)
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    book.metadata["language_info"] = {"name": "python"}
    return book


NOTEBOOKS = {
    "00_authenticate": nb(
        "00 · Authenticate with the Hugging Face Hub",
        "Checks, before any download, that this run can read what it needs: the token comes from `HF_TOKEN` in the "
        "environment and is never typed, printed or written. This notebook starts a new run.",
        "from medtune import auth, runs",
        PARAMS.format(empty="start a new run"),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR, new_run=True)"),
            ("md", "## 1. Token and access to the gated model\n\nLlama 4 Scout is gated: accept its license on the "
                   "Hub first. On the offline default profile the model and data are local and no Hub access is needed."),
            ("code", "status = auth.check_access(cfg)\nauth.show(status)"),
            ("md", "## Record"),
            ("code", 'run.record("auth", status)'),
        ],
    ),
    "01_load_quantized_model": nb(
        "01 · Load the model in 4-bit (QLoRA's NF4)",
        "The walkthrough's `BitsAndBytesConfig` (4-bit NF4, no double quantization, bf16 compute) with "
        "`device_map=\"auto\"`, the matching tokenizer, and a report of what was quantized and what was not.",
        "from medtune import config, modeling, runs",
        PARAMS.format(empty=LATEST),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)"),
            ("md", "## 1. Quantization config"),
            ("code", "config.bnb_config(cfg)"),
            ("md", "## 2. Load model and tokenizer\n\nThe tokenizer's padding token must differ from its EOS, or the "
                   "model never learns to stop."),
            ("code", "model, tokenizer = modeling.load_model(cfg)\n"
                     "print(f\"eos={tokenizer.eos_token!r} pad={tokenizer.pad_token!r}\")"),
            ("md", "## 3. What was quantized, and the memory it takes"),
            ("code", "report = modeling.quantization_report(model)\nmodeling.show_quantization(report)"),
            ("md", "## Record"),
            ("code", 'run.record("load", report)'),
        ],
    ),
    "02_check_gpu": nb(
        "02 · Check the GPU",
        "`nvidia-smi` as the walkthrough shows it, and per device: total, used and free memory, and the headroom left "
        "for training once the 4-bit model (size from 01) is loaded. Without a GPU it says so and shows CPU memory.",
        "from medtune import hardware, runs",
        PARAMS.format(empty=LATEST),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)"),
            ("md", "## 1. nvidia-smi"),
            ("code", 'print(hardware.nvidia_smi() or "nvidia-smi: no NVIDIA driver here; the run uses the CPU.")'),
            ("md", "## 2. Memory per device (GiB)"),
            ("code", 'rows = hardware.memory_table(model_gib=run.metrics().get("load", {}).get("footprint_gib", 0.0))\n'
                     "hardware.show(rows)"),
            ("md", "## Record"),
            ("code", 'run.record("gpu", {"devices": rows})'),
        ],
    ),
    "03_format_prompts": nb(
        "03 · Format the prompts",
        "The walkthrough's training template (task, clinical-expert role, `### Question`, `### Response` with the "
        "reasoning in `<think>` and the answer) in the profile's `language` (en or zh), the tokenizer's EOS appended, "
        "and a held-out split saved to the run that is never trained on.",
        "from medtune import data, modeling, runs",
        PARAMS.format(empty=LATEST),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)"),
            ("md", "## 1. Tokenizer (for its EOS token)"),
            ("code", "tokenizer = modeling.load_tokenizer(modeling.resolve_model(cfg.model), cfg.model_revision)\n"
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
            ("code", 'run.record("data", {k: v for k, v in summary.items() if k != "first_text"} | {"language": cfg.language})'),
        ],
    ),
    "04_baseline": nb(
        "04 · Baseline: the un-tuned model on held-out questions",
        "Answers of the 4-bit model before training, with the test template, and its held-out loss and perplexity "
        "on the reference responses. 06 repeats both with the adapter on the same examples.",
        "from IPython.display import Markdown, display\n\nfrom medtune import evaluate, modeling, runs",
        PARAMS.format(empty=LATEST) + "\nMAX_NEW_TOKENS: int = 0  # tokens per answer; 0: the profile's (walkthrough: 1200)",
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)\nmodel, tokenizer = modeling.load_model(cfg)"),
            ("md", "## 1. Answers to the held-out questions"),
            ("code", "answers = evaluate.answer_heldout(cfg, run, model, tokenizer, run.baseline_path, MAX_NEW_TOKENS)"),
            ("code", "display(Markdown(evaluate.show_answers(answers, rows=cfg.heldout_rows)))"),
            ("md", "## 2. Held-out loss and perplexity (response tokens)"),
            ("code", "loss = evaluate.heldout_loss(cfg, run, model, tokenizer)\nloss"),
            ("md", "## Record"),
            ("code", 'run.record("baseline", loss | evaluate.summarize(answers))'),
        ],
    ),
    "05_train_lora": nb(
        "05 · LoRA SFT",
        "LoRA (r=64, alpha=16, dropout 0.05 on q/k/v/o/gate/up/down_proj) on the 4-bit model, trained with TRL's "
        "`SFTTrainer` and the walkthrough's arguments. Checkpoints go into the run; re-running resumes from the last.",
        "from medtune import config, modeling, runs, train",
        PARAMS.format(empty=LATEST),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)\nmodel, tokenizer = modeling.load_model(cfg)"),
            ("md", "## 1. LoRA and SFT configuration"),
            ("code", "config.lora_config(cfg)"),
            ("code", "trainer = train.build_trainer(cfg, run, model, tokenizer)\n"
                     "trainer.model.print_trainable_parameters()"),
            ("md", "## 2. Train"),
            ("code", "result = train.train(trainer, run)\nresult"),
            ("md", "## 3. Loss curve"),
            ("code", "train.loss_curve(run);"),
            ("md", "## Record"),
            ("code", 'run.record("train", result)'),
        ],
    ),
    "06_evaluate_finetuned": nb(
        "06 · Evaluate the fine-tuned model",
        "The same held-out questions and reference responses as 04, with the LoRA adapter from 05: answers side by "
        "side and the metrics, baseline against fine-tuned.",
        "from IPython.display import Markdown, display\n\nfrom medtune import data, evaluate, modeling, runs",
        PARAMS.format(empty=LATEST) + "\nMAX_NEW_TOKENS: int = 0  # tokens per answer; 0: the profile's (use 04's value)",
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)\n"
                     "model, tokenizer = modeling.load_model(cfg, adapter=run.adapter_dir)"),
            ("md", "## 1. Answers with the adapter"),
            ("code", "answers = evaluate.answer_heldout(cfg, run, model, tokenizer, run.finetuned_path, MAX_NEW_TOKENS)"),
            ("md", "## 2. Held-out loss and perplexity"),
            ("code", "loss = evaluate.heldout_loss(cfg, run, model, tokenizer)\n"
                     'run.record("finetuned", loss | evaluate.summarize(answers))'),
            ("md", "## 3. Baseline vs fine-tuned"),
            ("code", "display(Markdown(evaluate.metrics_table(run)))"),
            ("code", "display(Markdown(evaluate.side_by_side(data.read_jsonl(run.baseline_path), answers)))"),
            ("md", "## Record\n\nEverything above is in the run's `metrics.json`."),
            ("code", "run.metrics()"),
        ],
    ),
    "07_push": nb(
        "07 · Push the adapter",
        "The adapter, tokenizer and a model card to the Hub (private by default). The default is a dry run: it writes "
        "exactly the folder that would be uploaded, `push/` in the run, and lists it.",
        "from medtune import hub, runs",
        PARAMS.format(empty=LATEST),
        [
            ("code", "cfg, run = runs.session(PARAMS, RUN_DIR)"),
            ("md", "## 1. Build the folder and push (or dry run)"),
            ("code", "result = hub.push(cfg, run)\nresult"),
            ("code", "hub.list_folder(run)"),
            ("md", "## Record"),
            ("code", 'run.record("push", result)'),
        ],
    ),
}


if __name__ == "__main__":
    folder = Path(__file__).resolve().parents[1] / "notebooks"
    folder.mkdir(exist_ok=True)
    for name, book in NOTEBOOKS.items():
        nbformat.write(book, folder / f"{name}.ipynb")
        print("wrote", folder / f"{name}.ipynb")
