"""Multiple-choice figures cross-checked with lm-evaluation-harness (``lm-eval``), the field's standard harness.

With ``benchmark_harness: true`` notebooks 04 and 06 hand the model they just scored (the same in-memory object:
4-bit, with the adapter in 06) to lm-eval's HF wrapper, offline, from local files, twice per benchmark:

- **same prompt** (``loglik`` mode): lm-eval scores exactly medtune's items, prompt (:func:`~medtune.evaluation.
  multiple_choice.mc_prompt` + ``ANSWER_PREFIX``) and letter continuations. Both must give the same log-likelihoods
  (within :data:`AGREEMENT_NATS`, a figure the table shows) and so the same letters: a check of medtune's own scoring
  (tokenization at the boundary, padding, batching), not a second opinion on the model.
- **its own prompt**: lm-eval's task for that benchmark (:data:`TASKS`: its MedQA 4-option, PubMedQA and MedMCQA
  tasks, with their own prompts and answer choices, zero-shot) on the same items, read from a local JSON file in the
  layout the task expects instead of its Hub dataset. This is the number comparable with figures published from
  lm-eval (``acc``; ``acc_norm`` also recorded); medtune's own accuracy is comparable between 04 and 06, not with
  published figures (other prompt), and the HuatuoGPT-o1 paper's are from generated answers (neither).

lm-eval is pinned in pyproject.toml's ``harness`` and ``dev`` extras; it is imported only here and only when asked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from medtune.evaluation import multiple_choice as _mc
from medtune.evaluation.heldout import resolve_batch_size

# medtune benchmark name -> lm-eval task run on its items with lm-eval's own prompt (names as in the scout profile)
TASKS = {"medqa": "medqa_4options", "pubmedqa": "pubmedqa", "medmcqa": "medmcqa"}
# Each task's file inside lm_eval/tasks/ (lm-eval 0.4.13), included by the local task file of :func:`own_prompt`:
# named here rather than looked up in lm-eval's task index, which reads every one of its ~10,000 task files.
TASK_FILES = {"medqa_4options": "medqa/medqa.yaml", "pubmedqa": "pubmedqa/pubmedqa.yaml",
              "medmcqa": "medmcqa/medmcqa.yaml"}
# Same items, same prompt: medtune's and lm-eval's log-likelihoods agree to this many nats per option (float32 on the
# CPU; medtune rounds its scores to 4 places). Measured: 0 to 5e-5 (tests/unit/test_harness.py).
AGREEMENT_NATS = 1e-3


class HarnessError(RuntimeError):
    """lm-eval is missing or a benchmark cannot be put into its task's layout; the message names the fix."""


def lm_eval_version() -> str | None:
    """The installed lm-eval's version, or None when it is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def task_for(name: str) -> str | None:
    """The lm-eval task that scores benchmark ``name`` with its own prompt (:data:`TASKS`), or None."""
    return TASKS.get(name)


def task_document(item: _mc.MCItem, task: str) -> dict:
    """One item in the layout of the dataset that lm-eval's ``task`` reads (its ``doc_to_text`` and
    ``doc_to_target`` take these fields).

    Args:
        item: a medtune item. task: one of :data:`TASKS`' values.

    Returns:
        ``medqa_4options`` (GBaker/MedQA-USMLE-4-options-hf): ``{"sent1", "ending0".."ending3", "label"}``;
        ``pubmedqa`` (bigbio/pubmed_qa source schema): ``{"QUESTION", "CONTEXTS", "final_decision"}``;
        ``medmcqa`` (openlifescienceai/medmcqa): ``{"question", "opa".."opd", "cop"}``.

    Raises:
        HarnessError: the item does not fit the task (not 4 options; PubMedQA options other than yes/no/maybe or no
            context); an unknown task.
    """
    gold = _mc.LETTERS.index(item.answer)
    four = len(item.options) == 4
    if task == "medqa_4options" and four:
        return {"sent1": item.question, **{f"ending{i}": o for i, o in enumerate(item.options)}, "label": gold}
    if task == "medmcqa" and four:
        return {"question": item.question, **dict(zip(("opa", "opb", "opc", "opd"), item.options, strict=True)),
                "cop": gold}
    if task == "pubmedqa" and item.options == _mc.PUBMEDQA_OPTIONS and item.context:
        return {"QUESTION": item.question, "CONTEXTS": item.context.split("\n"), "final_decision": item.options[gold]}
    if task not in TASKS.values():
        raise HarnessError(f"unknown lm-eval task {task!r}; medtune converts items for {', '.join(TASKS.values())}.")
    raise HarnessError(f"item {item.id} ({len(item.options)} options{', no context' if not item.context else ''}) "
                       f"does not fit lm-eval's {task} task.")


def _harness_model(model, tokenizer, batch_size: int):
    """lm-eval's HF wrapper around the in-memory model (no copy, no reload)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise HarnessError("benchmark_harness: true needs lm-eval: make env EXTRAS=harness (or pip install -e "
                           "'.[harness]', which pins lm-eval 0.4.13).") from None
    device = next(model.parameters()).device
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))


def task_file(task: str) -> Path:
    """lm-eval's own file for ``task`` (:data:`TASK_FILES`), in the installed lm-eval."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / TASK_FILES[task]


def _evaluate(lm, tasks: list, include: Path | None = None) -> dict:
    """``lm_eval.simple_evaluate`` zero-shot with per-item samples, no bootstrap, leaving the global RNGs alone; tasks
    given inline or found in ``include`` only (lm-eval's own index is not built)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include) if include else None, include_defaults=False)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0,
                           random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                           fewshot_random_seed=None)


def _write(rows: Sequence[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _by_doc(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=lambda s: s["doc_id"])


def same_prompt(lm, items: Sequence[_mc.MCItem], language: str, path: Path) -> list[list[float]]:
    """lm-eval's log-likelihood (nats) of each item's option letters after medtune's own prompt and answer prefix,
    from ``path`` (written here: one JSON object per item with the prompt, the continuations and the gold index).

    Returns:
        One list per item: the log-likelihood of each option's letter continuation, in letter order.
    """
    prefix, letter = _mc.ANSWER_PREFIX[language], _mc.LETTER_CONTINUATION[language]
    rows = [{"prompt": _mc.mc_prompt(i, language) + prefix,
             "choices": [letter.format(letter=_mc.LETTERS[k]) for k in range(len(i.options))],
             "gold": _mc.LETTERS.index(i.answer)} for i in items]
    _write(rows, path)
    task = {"task": f"medtune_same_prompt_{path.stem}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{prompt}}", "target_delimiter": "",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    out = _evaluate(lm, [task])
    samples = _by_doc(out["samples"][task["task"]])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def own_prompt(lm, items: Sequence[_mc.MCItem], task: str, folder: Path) -> dict:
    """lm-eval's ``task`` with its own prompt and choices on ``items``, read from a local JSON file: a task file in
    ``folder`` includes lm-eval's own task file and replaces only its dataset (and drops its train/validation
    splits, so nothing is fetched).

    Returns:
        ``{"task", "items", "accuracy" (lm-eval's acc), "accuracy_norm" (acc_norm, or None where the task has none),
        "predicted": [letters]}``.

    Raises:
        HarnessError: an item does not fit the task (:func:`task_document`).
    """
    docs = [task_document(i, task) for i in items]
    data = _write(docs, folder / f"{task}.jsonl")
    source = task_file(task)
    name = f"medtune_{task}"
    (folder / f"{name}.yaml").write_text(
        f"include: {json.dumps(str(source))}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n", encoding="utf-8")
    out = _evaluate(lm, [name], folder)
    metrics = out["results"][name]
    predicted = []
    for s in _by_doc(out["samples"][name]):
        scores = [float(r[0]) for r in s["filtered_resps"]]
        predicted.append(_mc.LETTERS[max(range(len(scores)), key=lambda k: (scores[k], -k))])
    return {"task": task, "items": len(docs), "accuracy": round(float(metrics["acc,none"]), 4),
            "accuracy_norm": round(float(metrics["acc_norm,none"]), 4) if "acc_norm,none" in metrics else None,
            "predicted": predicted}


def compare(ours: Sequence[dict], theirs: Sequence[Sequence[float]]) -> dict:
    """medtune's log-likelihood predictions against lm-eval's on the same items and prompt.

    Args:
        ours: :func:`~medtune.evaluation.multiple_choice.predict_loglik`'s predictions (``scores``, ``predicted``,
            ``answer``). theirs: :func:`same_prompt`'s log-likelihoods, item by item.

    Returns:
        ``{"items", "accuracy" (lm-eval's argmax against the gold letters), "agree" (share of items where both pick
        the same letter), "max_abs_diff_nats" (over every option of every item), "within_margin" (the largest
        difference <= :data:`AGREEMENT_NATS` and every letter the same)}``.
    """
    picks, diffs = [], []
    for p, scores in zip(ours, theirs, strict=True):
        picks.append(_mc.LETTERS[max(range(len(scores)), key=lambda k: (scores[k], -k))])
        diffs += [abs(a - b) for a, b in zip(p["scores"], scores, strict=True)]
    n = len(picks)
    agree = sum(a == p["predicted"] for a, p in zip(picks, ours, strict=True))
    worst = max(diffs, default=0.0)
    return {"items": n,
            "accuracy": round(sum(a == p["answer"] for a, p in zip(picks, ours, strict=True)) / n, 4) if n else None,
            "agree": round(agree / n, 4) if n else None, "max_abs_diff_nats": round(worst, 6),
            "within_margin": agree == n and worst <= AGREEMENT_NATS}


def cross_check(cfg, run, model, tokenizer, stage: str, results: dict) -> dict:
    """Notebooks 04 and 06, after :func:`~medtune.evaluation.multiple_choice.measure`: each benchmark of ``results``
    scored again by lm-eval on the same in-memory model (module docstring), when ``cfg.benchmark_harness`` is on.

    The same-prompt check needs ``benchmark_mode: loglik`` (it compares log-likelihoods); in ``generate`` mode only
    lm-eval's own-prompt figure is taken. A benchmark without an lm-eval task (:data:`TASKS`), or whose items do not
    fit it, has no own-prompt figure; the reason is recorded. The files lm-eval read are kept in
    ``<run>/benchmarks/harness/<stage>-<name>/``.

    Args:
        stage: "baseline" (04) or "finetuned" (06). results: ``measure``'s results for this stage.

    Returns:
        ``results`` with ``"harness": {"lm_eval", "same_prompt" (:func:`compare`, or None), "own_prompt"
        (:func:`own_prompt` less its per-item letters, or None), "note"}`` added to each benchmark; ``results``
        unchanged when ``benchmark_harness`` is off.

    Raises:
        HarnessError: lm-eval is not installed.
    """
    if not cfg.benchmark_harness or not results:
        return results
    out = {}
    for name, r in results.items():
        spec = _mc.spec_of(cfg.benchmarks[name])
        items = _mc.read_benchmark(spec["source"], spec["config"], spec["split"], cfg.benchmark_limit)
        folder = run.path / "benchmarks" / "harness" / f"{stage}-{name}"
        longest = max(len(tokenizer(_mc.mc_prompt(i, r["language"]))["input_ids"]) for i in items)
        # lm-eval keeps every position's logits (no logits_to_keep): "auto" sizes batches for that
        size = resolve_batch_size(cfg.eval_batch_size, model, longest, len(items), full_logits=True)
        lm = _harness_model(model, tokenizer, size)
        check: dict = {"lm_eval": lm_eval_version(), "same_prompt": None, "own_prompt": None, "note": ""}
        if r["mode"] == "loglik":
            ours = _mc.load_predictions(_mc.predictions_path(run, stage, name))
            check["same_prompt"] = compare(ours, same_prompt(lm, items, r["language"], folder / "same_prompt.jsonl"))
            if not check["same_prompt"]["within_margin"]:
                print(f"warning, {name}: lm-eval and medtune disagree on the same prompt: {check['same_prompt']}")
        else:
            check["note"] = "same-prompt check skipped: it compares log-likelihoods (benchmark_mode: loglik). "
        task = task_for(name)
        if task is None:
            check["note"] += (f"no lm-eval task for '{name}' (named {', '.join(TASKS)} in the profile, a benchmark is "
                              "also scored with lm-eval's own prompt).")
        else:
            try:
                own = own_prompt(lm, items, task, folder)
                check["own_prompt"] = {k: v for k, v in own.items() if k != "predicted"}
            except HarnessError as err:
                check["note"] += f"not scored with lm-eval's {task}: {err}"
        out[name] = {**r, "harness": check}
        print(f"{name}: lm-eval {check['lm_eval']}: same prompt {check['same_prompt']}; own prompt "
              f"{check['own_prompt']}", flush=True)
    return out


def show(results: dict) -> str:
    """Markdown table of :func:`cross_check`'s figures beside medtune's accuracy (empty when it did not run)."""
    rows = [(n, r) for n, r in results.items() if r.get("harness")]
    if not rows:
        return "_lm-evaluation-harness cross-check off (benchmark_harness: false in the profile)._"
    lines = ["| benchmark | medtune accuracy | lm-eval, same prompt: accuracy | letters agree | largest difference "
             "(nats) | lm-eval task (its own prompt) | acc | acc_norm |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for name, r in rows:
        h = r["harness"]
        same, own = h.get("same_prompt") or {}, h.get("own_prompt") or {}
        lines.append(f"| {name} | {r.get('accuracy')} | {same.get('accuracy', '')} | {same.get('agree', '')} | "
                     f"{same.get('max_abs_diff_nats', '')} | {own.get('task', '')} | {own.get('accuracy', '')} | "
                     f"{own.get('accuracy_norm', '')} |")
    notes = [f"{name}: {r['harness']['note']}" for name, r in rows if r["harness"].get("note")]
    return "\n".join(lines + ([""] + notes if notes else []) + [
        "", f"Same prompt: medtune's and lm-eval's log-likelihoods should agree within {AGREEMENT_NATS} nats. "
        "lm-eval's own prompt (acc) is the figure comparable with results published from lm-eval."])
