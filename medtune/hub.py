"""Push (the walkthrough's step 07): the adapter and tokenizer to the Hugging Face Hub, or a dry run.

The dry run (the default) writes exactly the folder that would be uploaded, ``<run>/push/``, and lists it. The push
uploads that same folder with :meth:`huggingface_hub.HfApi.upload_folder`, so what you reviewed is what lands.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from medtune import auth as _auth
from medtune import config as _config

# Files of a saved adapter + tokenizer that belong on the Hub; checkpoints and optimizer states do not.
_SKIP_SUFFIXES = (".pt", ".pth", ".bin.tmp")


def build_folder(cfg: _config.RunConfig, run) -> list[tuple[str, int]]:
    """Write ``run.push_dir``: the adapter, the tokenizer and a model card. Returns ``[(file, bytes)]``.

    Raises:
        FileNotFoundError: notebook 05 has not saved an adapter for this run.
    """
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter in {run.adapter_dir}: run notebook 05 (LoRA SFT) for this run first.")
    if run.push_dir.exists():
        shutil.rmtree(run.push_dir)
    shutil.copytree(run.adapter_dir, run.push_dir, ignore=shutil.ignore_patterns(*("*" + s for s in _SKIP_SUFFIXES)))
    (run.push_dir / "README.md").write_text(model_card(cfg, run), encoding="utf-8")
    return sorted((str(p.relative_to(run.push_dir)), p.stat().st_size) for p in run.push_dir.rglob("*") if p.is_file())


def model_card(cfg: _config.RunConfig, run) -> str:
    """A short model card: base model, dataset, how it was trained, and the run's held-out metrics."""
    m = run.metrics()
    base = cfg.model if not cfg.model.startswith("package:") else "HuggingFaceTB/SmolLM2-135M-Instruct"
    lines = [
        "---", f"base_model: {base}", "library_name: peft", "tags: [medtune, qlora, lora, sft, medical]", "---", "",
        f"# LoRA adapter for {base} (medtune run {run.run_id})", "",
        f"QLoRA (4-bit NF4 + LoRA r={cfg.lora.get('r')}, alpha={cfg.lora.get('lora_alpha')}) SFT on `{cfg.dataset}` "
        f"with medtune, loss on the {'response only' if cfg.loss_on == 'response' else 'whole text'}.", "",
    ]
    if "baseline" in m and "finetuned" in m:
        b, f = m["baseline"], m["finetuned"]
        lines += ["| held-out metric | baseline | fine-tuned |", "|---|---|---|",
                  f"| response loss (nats/token) | {b.get('loss')} | {f.get('loss')} |",
                  f"| perplexity | {b.get('perplexity')} | {f.get('perplexity')} |", ""]
    return "\n".join(lines)


def push(cfg: _config.RunConfig, run) -> dict:
    """Upload ``run.push_dir`` to ``cfg.hub_repo_id`` when ``cfg.push`` is True; otherwise a dry run.

    Returns:
        ``{"dry_run": bool, "repo_id", "files": n, "bytes": total, "url": str | None}``.

    Raises:
        ConfigError: push requested without ``hub_repo_id``. AuthError: no token.
    """
    files = build_folder(cfg, run)
    total = sum(n for _, n in files)
    result = {"dry_run": not cfg.push, "repo_id": cfg.hub_repo_id, "files": len(files), "bytes": total, "url": None}
    if not cfg.push:
        return result
    if not cfg.hub_repo_id:
        raise _config.ConfigError("push: true needs hub_repo_id (e.g. 'you/llama4-scout-medical-qlora') in the profile or as HUB_REPO_ID.")
    token = _auth.hub_token()
    if token is None:
        raise _auth.AuthError("HF_TOKEN is not set: export a token with write access before pushing.")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(cfg.hub_repo_id, private=cfg.hub_private, exist_ok=True)
    info = api.upload_folder(folder_path=str(run.push_dir), repo_id=cfg.hub_repo_id, commit_message=f"medtune run {run.run_id}")
    result["url"] = str(getattr(info, "commit_url", info))
    return result


def list_folder(run) -> None:
    """Print the push folder's files and sizes."""
    for p in sorted(run.push_dir.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>12,d}  {p.relative_to(run.push_dir)}")
