"""Preflight (notebooks 00 and 01): what can be checked before a large download or a model load, in seconds.

Users pay by the GPU-hour on machines that can be pre-empted; the costly failures are the ones found late. Before
anything large is fetched or loaded, :func:`run` checks, and reports every failure at once in one
:class:`PreflightError` (each with its fix):

- **settings vs. this machine**: ``sft.bf16``/``sft.fp16`` need a GPU that supports them; 4-bit
  (``quantization.load_in_4bit``) needs bitsandbytes to import and quantize on the device the run uses;
  ``device: cuda`` needs a GPU.
- **access**: the token is accepted and the gated model's license is granted (:func:`medtune.stages.auth.check_access`).
- **rows**: the dataset read, checked and split exactly as 03 will, its training texts counted with the profile's
  tokenizer (for a Hub model only the tokenizer files are fetched) against ``sft.max_length``
  (:func:`check_dataset_file`): bad or over-long rows, ``heldout_rows`` past the rows read, a ``heldout_size`` that
  leaves nothing to train on.
- **memory**: an estimate of the training peak for the chosen quantization and expert dispatch
  (:func:`estimate_memory`, from the model's ``config.json`` only) against free GPU memory (or free RAM on CPU).
- **disk**: the model's download (file sizes from the Hub's or ModelScope's file metadata, through
  :mod:`medtune.io.sources`; files already in the cache not counted), Llama 4's NF4 experts cache and the run's
  checkpoints against free space where each goes.
- **library versions** against the tested set pinned in ``pyproject.toml``: a mismatch is a warning, never an error.

On the default profile (model and data inside installed packages) nothing is contacted and it takes about a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import io
import math
import os
import shutil
from pathlib import Path

from medtune import families
from medtune.settings import config as _config

GIB = 2**30
NF4_BLOCK = 64  # weights per absmax block: bitsandbytes' 4-bit default (BitsAndBytesConfig, functional.quantize_4bit)
NESTED_BLOCK = 256  # absmax values per second-level block with double quantization (bitsandbytes functional.py)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PreflightError(RuntimeError):
    """One or more preflight checks failed. ``str(err)`` lists each with its fix; ``err.failed`` holds them."""

    def __init__(self, failed: list[Check]):
        self.failed = failed
        lines = [f"preflight: {len(failed)} check{'s' * (len(failed) > 1)} failed; nothing was downloaded or loaded."]
        for c in failed:
            lines.append(f"  [{c.name}] {c.detail}" + (f" Fix: {c.fix}" if c.fix else ""))
        super().__init__("\n".join(lines))


@dataclasses.dataclass
class Check:
    """One preflight result. ``status``: "ok", "warning", "error" or "skipped"; ``name`` is the profile key or
    the resource it is about ("sft.bf16", "quantization.load_in_4bit", "access", "memory", "disk", "versions")."""

    name: str
    status: str
    detail: str
    fix: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Memory estimate
# ----------------------------------------------------------------------------------------------------------------

def _bytes_4bit(double_quant: bool) -> float:
    """Bytes per weight of bitsandbytes NF4/FP4: 0.5 (packed) + absmax: fp32 per 64 weights, or with double
    quantization uint8 per 64 plus fp32 per 256 x 64 (bitsandbytes functional.quantize_4bit)."""
    return 0.5 + (1 / NF4_BLOCK + 4 / (NF4_BLOCK * NESTED_BLOCK) if double_quant else 4 / NF4_BLOCK)


def _targets(lora: dict) -> set[str]:
    """Which of :data:`LINEAR_NAMES` a LoRA ``target_modules`` (list of names, one regex, or "all-linear") hits."""
    t = lora.get("target_modules")
    if t is None:
        return set()
    if isinstance(t, str):
        return set(LINEAR_NAMES) if t == "all-linear" else {n for n in LINEAR_NAMES if n in t}
    return {n for n in LINEAR_NAMES if n in set(t)}


def _rank(lora: dict, name: str) -> int:
    """LoRA rank of the target ``name`` (a dotted name without the layer prefix): the first ``rank_pattern`` key that
    matches its end as PEFT matches them (``peft.utils.other.get_pattern_key``: ``(.*\\.)?(key)$``), else ``r``."""
    import re

    for key, rank in (lora.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", f"model.layers.0.{name}"):
            return int(rank)
    return int(lora.get("r", 8))


def estimate_memory(model_config, *, quantization: dict | None = None, llama4_fast: bool = True,
                    lora: dict | None = None, tokens: int = 2048, checkpointing: bool = True,
                    optim: str = "adamw_torch", compute_bytes: int = 2) -> dict:
    """Estimate the device memory of QLoRA training from a model's config alone, in GiB (2**30 bytes).

    Parameters are counted by kind from the config (Llama and Llama 4 text layouts; a Llama 4 multimodal config's
    ``text_config`` is used, its vision tower is not counted):

    - attention q/k/v/o and MLP / shared-expert gate/up/down ``nn.Linear``: 4-bit when ``load_in_4bit`` (0.5 B per
      weight + absmax, :func:`_bytes_4bit`), 8-bit 1 B, else ``compute_bytes``;
    - Llama 4 routed experts (fused 3-D parameters, which bitsandbytes does not convert): NF4 like the above with
      ``llama4_fast``, else bf16 (2 B per weight), as transformers leaves them (FIELD-NOTES.md);
    - embeddings, ``lm_head`` (unless tied) and norms in ``compute_bytes`` (transformers loads non-quantized weights
      in the compute dtype: 2 for bf16, 4 for float32);
    - LoRA: ``r * (in + out)`` per targeted Linear (and ``r * E * (in + out)`` per targeted expert parameter, ``r``
      from ``rank_pattern`` where one of its keys matches the parameter's name as PEFT matches it), fp32
      weights + fp32 gradients + AdamW's two fp32 states (16 B per parameter; 8-bit optimizers 10 B);
    - activations for one step of ``tokens`` tokens (``max_length * per_device_train_batch_size``): with activation
      checkpointing each layer's bf16 input (``L * T * H * 2``), plus one layer's forward+backward working set
      (``T * (6H + 2 * kv + 3I_shared + 3I * top_k) * 2 * 2``; transformers' dense expert dispatch runs every
      token through all E experts: ``T * E * (H + 3I) * 4``), plus with ``llama4_fast`` one layer's ``gate_up``
      dequantized to bf16 (``E * H * 2I * 2``); without checkpointing every layer's working set. The LM head's
      logits are not counted (TRL's fused LM head computes them in tiles).

    Checked against docs/bench-h200.md (Scout's text config, r=64 on the seven projections, 4,096 tokens, one H200):
    weights 58.7 GiB measured (medtune path), ~184 GiB for the 48 layers on the walkthrough's path, training peaks
    67.4 GiB (48 layers), 11.4 GiB and 23.0 GiB (3 layers, medtune and walkthrough): tests/unit/test_preflight.py holds
    the estimate within 10% of each.

    Returns:
        ``{"weights_gib", "layers_gib", "lora_gib", "activations_gib", "total_gib", "params": {...}}`` where
        ``layers_gib`` is the decoder layers' weights alone and ``params`` counts weights by kind (elements).
    """
    quantization = quantization or {}
    lora = lora or {}
    tc = getattr(model_config, "text_config", None) or model_config
    h, n_layers, vocab = tc.hidden_size, tc.num_hidden_layers, tc.vocab_size
    n_heads = tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or n_heads
    head = getattr(tc, "head_dim", None) or h // n_heads
    llama4 = families.is_llama4(tc)
    moe_layers = set(getattr(tc, "moe_layers", None) or []) if llama4 else set()
    experts = getattr(tc, "num_local_experts", 0) if moe_layers else 0
    top_k = getattr(tc, "num_experts_per_tok", 1)
    inter = tc.intermediate_size  # Llama: MLP; Llama 4: expert and shared-expert dim
    inter_dense = getattr(tc, "intermediate_size_mlp", inter) if llama4 else inter  # Llama 4's non-MoE layers

    attn = h * n_heads * head * 2 + h * n_kv * head * 2
    linear = expert = router = 0
    lora_params = 0
    r = int(lora.get("r", 8))
    hit = _targets(lora)
    proj_shapes = {"q_proj": (h, n_heads * head), "k_proj": (h, n_kv * head), "v_proj": (h, n_kv * head),
                   "o_proj": (n_heads * head, h)}
    for layer in range(n_layers):
        mlp_dim = inter if layer in moe_layers else inter_dense
        linear += attn + 3 * h * mlp_dim
        shapes = {**proj_shapes, "gate_proj": (h, mlp_dim), "up_proj": (h, mlp_dim), "down_proj": (mlp_dim, h)}
        lora_params += sum(r * (i + o) for name, (i, o) in shapes.items() if name in hit)
        if layer in moe_layers:
            expert += 3 * experts * h * inter
            router += h * experts
    targets = lora.get("target_parameters") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if moe_layers and any("gate_up_proj" in t for t in targets):
        lora_params += len(moe_layers) * _rank(lora, "feed_forward.experts.gate_up_proj") * experts * (h + 2 * inter)
    if moe_layers and any("experts.down_proj" in t for t in targets):
        lora_params += len(moe_layers) * _rank(lora, "feed_forward.experts.down_proj") * experts * (inter + h)
    embed = vocab * h
    tied = getattr(tc, "tie_word_embeddings", getattr(model_config, "tie_word_embeddings", False))
    head_params = 0 if tied else vocab * h
    norms = (2 * n_layers + 1) * h

    four_bit = bool(quantization.get("load_in_4bit"))
    eight_bit = bool(quantization.get("load_in_8bit"))
    q_bytes = (_bytes_4bit(bool(quantization.get("bnb_4bit_use_double_quant"))) if four_bit
               else (1.0 if eight_bit else compute_bytes))
    fast = llama4 and llama4_fast
    expert_bytes = q_bytes if (fast and four_bit) else 2.0
    layers_b = (linear + router) * q_bytes + expert * expert_bytes + 2 * n_layers * h * compute_bytes
    weights_b = layers_b + (embed + head_params) * compute_bytes + h * compute_bytes

    state_bytes = 10 if "8bit" in optim else 16
    lora_b = lora_params * state_bytes

    kv = n_kv * head
    dense_moe = llama4 and not llama4_fast
    per_layer = tokens * (6 * h + 2 * kv + 3 * (inter if moe_layers else inter_dense)) * 2 * 2
    if moe_layers:
        per_layer += tokens * experts * (h + 3 * inter) * 4 if dense_moe else tokens * 3 * inter * top_k * 2 * 2
    act_b = (n_layers * tokens * h * 2 + per_layer) if checkpointing else n_layers * per_layer
    if fast and moe_layers and four_bit:
        act_b += experts * h * 2 * inter * 2
    total = weights_b + lora_b + act_b
    return {
        "weights_gib": round(weights_b / GIB, 2), "layers_gib": round(layers_b / GIB, 2),
        "lora_gib": round(lora_b / GIB, 2), "activations_gib": round(act_b / GIB, 2),
        "total_gib": round(total / GIB, 2),
        "params": {"linear": linear, "routed_experts": expert, "embeddings": embed, "lm_head": head_params,
                   "norms": norms, "router": router, "lora": lora_params},
    }


def _sft(cfg: _config.RunConfig, key: str):
    """The effective value of an SFTConfig field: the profile's, else TRL's default."""
    if key in cfg.sft:
        return cfg.sft[key]
    from trl import SFTConfig

    field = SFTConfig.__dataclass_fields__[key]
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def estimate_for(cfg: _config.RunConfig, model_config) -> dict:
    """:func:`estimate_memory` with the run's settings: its quantization, ``llama4_fast``, LoRA, and
    ``max_length * per_device_train_batch_size`` tokens, activation checkpointing and optimizer from ``sft``."""
    from medtune.stages.data import sft_max_length

    compute = str(cfg.quantization.get("bnb_4bit_compute_dtype", "bfloat16"))
    checkpointing = _sft(cfg, "activation_checkpointing")
    if checkpointing is None:
        checkpointing = _sft(cfg, "gradient_checkpointing")
    tokens = (sft_max_length(cfg) or 2048) * int(_sft(cfg, "per_device_train_batch_size"))
    return estimate_memory(model_config, quantization=cfg.quantization, llama4_fast=cfg.llama4_fast, lora=cfg.lora,
                           tokens=tokens, checkpointing=bool(checkpointing), optim=str(_sft(cfg, "optim")),
                           compute_bytes=4 if "32" in compute else 2)


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------

def _uses_gpu(cfg: _config.RunConfig) -> bool:
    import torch

    return cfg.device != "cpu" and torch.cuda.is_available()


def check_settings(cfg: _config.RunConfig) -> list[Check]:
    """Settings this machine cannot run: ``device: cuda`` without a GPU, ``sft.bf16``/``sft.fp16`` without a GPU
    that supports them (TRL's SFTConfig trains in bf16 when neither is set), 4-bit without a working bitsandbytes,
    ``num_processes`` above the visible GPUs (:func:`medtune.settings.config.process_backend`).
    """
    import torch

    checks: list[Check] = []
    gpu = _uses_gpu(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        checks.append(Check("device", "error", "device: cuda, but torch sees no GPU.",
                            "set device: auto (or cpu), or check the NVIDIA driver and CUDA_VISIBLE_DEVICES."))
    why_not = ("this run uses the CPU (device: cpu)" if torch.cuda.is_available() and cfg.device == "cpu"
               else "torch sees no GPU")
    bf16 = cfg.sft.get("bf16")
    fp16 = bool(cfg.sft.get("fp16", False))
    if bf16 is None:
        bf16 = not fp16  # TRL's SFTConfig default
    if bf16:
        said = "sft.bf16 is true" if cfg.sft.get("bf16") else "sft.bf16 is not set (TRL then trains in bf16)"
        if not gpu:
            checks.append(Check("sft.bf16", "error", f"{said}, but {why_not}.",
                                "set bf16: false in the profile's sft section (CPU trains in float32), or use "
                                "params/default.yaml, which is made for machines without a GPU."))
        elif not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(0)
            checks.append(Check("sft.bf16", "error", f"{said}, but the GPU ({name}) has no bf16 support (needs "
                                "compute capability 8.0+, e.g. A100, H100, H200).",
                                "set bf16: false and fp16: true in the sft section, and "
                                "bnb_4bit_compute_dtype: float16 in the quantization section."))
    if fp16 and not gpu:
        checks.append(Check("sft.fp16", "error", f"sft.fp16 is true, but {why_not}.",
                            "set fp16: false in the profile's sft section, or use params/default.yaml."))
    checks.extend(_check_bitsandbytes(cfg, gpu))
    try:  # num_processes against the visible GPUs (05, data-parallel)
        _config.process_backend(cfg, torch.cuda.device_count())
    except _config.ConfigError as err:
        checks.append(Check("num_processes", "error", str(err).split(" Fix: ")[0],
                            str(err).split(" Fix: ")[-1] if " Fix: " in str(err) else "set num_processes: 1."))
    if not checks:
        checks.append(Check("settings", "ok", f"precision and quantization can run on this {'GPU' if gpu else 'CPU'}."))
    return checks


def _check_bitsandbytes(cfg: _config.RunConfig, gpu: bool) -> list[Check]:
    """Import bitsandbytes and quantize 64 weights on the run's device: an empirical probe of what its build can do."""
    key = ("load_in_4bit" if cfg.quantization.get("load_in_4bit")
           else "load_in_8bit" if cfg.quantization.get("load_in_8bit") else None)
    if key is None:
        return []
    fix = ("install the tested build (pip install bitsandbytes==0.50.2; `make env` does), or set quantization: {} to "
           "load the model unquantized (about 4x the memory of 4-bit).")
    try:
        import bitsandbytes.functional as bnbf
    except Exception as err:  # noqa: BLE001 -- ImportError, or a broken native library raising anything
        return [Check(f"quantization.{key}", "error", f"quantization.{key} is true, but bitsandbytes does not import "
                      f"({type(err).__name__}: {str(err)[:200]}).", fix)]
    import torch

    device = "cuda" if gpu else "cpu"
    try:
        weights = torch.zeros(NF4_BLOCK, dtype=torch.float32, device=device)
        if key == "load_in_4bit":
            bnbf.quantize_4bit(weights, quant_type=str(cfg.quantization.get("bnb_4bit_quant_type", "nf4")))
        else:
            bnbf.int8_vectorwise_quant(weights.reshape(1, -1).half())
    except Exception as err:  # noqa: BLE001 -- whatever the backend raises: it cannot run here
        return [Check(f"quantization.{key}", "error", f"quantization.{key} is true, but bitsandbytes "
                      f"{_version('bitsandbytes')} cannot quantize on {device} "
                      f"({type(err).__name__}: {str(err)[:200]}).",
                      "use device: cpu (bitsandbytes 0.50 runs NF4 on CPU), or " + fix)]
    return []


def check_access(cfg: _config.RunConfig, status: dict | None = None) -> tuple[Check, dict | None]:
    """Token accepted and gated access granted (:func:`medtune.stages.auth.check_access`, or its earlier ``status``)."""
    from medtune.io import sources
    from medtune.stages import auth

    if status is None:
        try:
            status = auth.check_access(cfg)
        except sources.SourceError as err:  # the message says what happened and the fix
            return Check("access", "error", str(err)), None
    if not status.get("hub_needed"):
        return Check("access", "ok", "model and dataset are local: no Hub or ModelScope access needed."), status
    who = f"as {status['user']}" if status.get("user") else "anonymously (no token set)"
    return Check("access", "ok",
                 f"{status['source']} ({status['endpoint']}) {who}: model and dataset readable."), status


def check_push(cfg: _config.RunConfig) -> Check:
    """With ``push: true``, the token 07 uploads with must be set now, not found missing after training.

    (``hub_repo_id`` is required at load: :mod:`medtune.settings.config`. Write access itself is checked by 07's
    upload.)
    """
    from medtune.io import sources

    if not cfg.push:
        return Check("push", "ok", "dry run (push: false): 07 writes the folder it would upload.")
    var = sources.TOKEN_VARIABLES[cfg.push_to][0]
    try:
        token = sources.get_token(cfg.push_to)
    except sources.TokenError as err:
        return Check("push", "error", str(err))
    if token is None:
        return Check("push", "error", f"push: true to {cfg.push_to} ({cfg.hub_repo_id}), but {var} is not set.",
                     f"create a token with write access ({sources.TOKEN_PAGES[cfg.push_to]}) and `export {var}=...` "
                     "before starting, or push: false for a dry run")
    return Check("push", "ok", f"07 will upload to {cfg.push_to}: {cfg.hub_repo_id} ({var} is set).")


def check_tokens() -> Check:
    """The token variables that are set must hold a token and nothing else (a pasted line break, say): found here,
    in 00, rather than by the first download or load that reads them. Never shows a value."""
    from medtune.io import sources

    problems = []
    for kind in sources.TOKEN_VARIABLES:
        try:
            sources.get_token(kind)
        except sources.TokenError as err:
            problems.append(str(err))
    if problems:
        return Check("tokens", "error", " ".join(problems))
    return Check("tokens", "ok", "token variables: unset or well-formed (values never shown).")


_OVER_LONG_LISTED = 10  # over-long rows spelled out in 00's line when they are skipped (03 lists them all)


def check_dataset_file(cfg: _config.RunConfig, tokenizer=None, *, remote: bool = True) -> Check:
    """The dataset read, every row checked and split now, exactly as 03 will (:func:`medtune.stages.data.split_rows`),
    so that nothing 03 would refuse is found after 01 loaded the model: a broken file or row, over-long rows (with
    ``tokenizer``: training texts longer than ``sft.max_length`` tokens, each listed with its length, and the fixes),
    ``heldout_rows`` past the rows read, a ``heldout_size`` that leaves nothing to train on, fewer than 2 usable rows.

    Args:
        cfg: the run's settings.
        tokenizer: the profile's tokenizer (:func:`medtune.stages.modeling.profile_tokenizer`), or None to leave the
            length check to 03.
        remote: whether a Hub or ModelScope dataset may be read (downloaded, or from the cache) now; False (the
            access check failed): it is left to 03.

    Returns:
        A :class:`Check` named "dataset": "error" with 03's own message, else "ok" with the usable rows, the split,
        the token lengths against ``sft.max_length``, and the rows ``bad_rows: skip`` will leave out.
    """
    from medtune.io import sources
    from medtune.stages import data

    report = data.RowReport()
    try:
        ref = sources.parse_source(cfg.dataset)
        if ref.kind not in ("package", "file", "folder") and (not remote or sources.for_dataset(cfg) is None):
            why = "the access check failed" if not remote else "it is not a local path or a Hub id"
            return Check("dataset", "skipped", f"{cfg.dataset} is read in 03 ({why}).")
        name = data.package_path(cfg.dataset).name if ref.kind == "package" else (
            ref.path.name if ref.kind == "file" else cfg.dataset)
        with contextlib.redirect_stdout(io.StringIO()):  # 03 prints the skipped rows; here only the verdict counts
            rows, train, heldout = data.split_rows(cfg, tokenizer, report)
    except (data.DataError, FileNotFoundError) as err:
        return Check("dataset", "error", str(err))
    except sources.SourceError as err:
        return Check("dataset", "error", f"cannot read the dataset {cfg.dataset}: {err}")
    parts = [f"{name}: {len(rows)} usable rows of {report.read} read, {len(train)} to train and {len(heldout)} held "
             "out"]
    if report.tokens:
        counts = report.tokens.values()
        parts.append(f"training texts {min(counts):,}-{max(counts):,} tokens (sft.max_length "
                     f"{report.max_length:,})")
    elif tokenizer is None:
        parts.append("token lengths checked in 03")
    if report.bad:
        over = report.over_long()
        shown = ", ".join(f"{report.unit} {n} ({t:,} tokens)" for n, t in over[:_OVER_LONG_LISTED])
        more = f" and {len(over) - _OVER_LONG_LISTED} more" if len(over) > _OVER_LONG_LISTED else ""
        parts.append(f"{len(report.bad)} bad rows to skip (bad_rows: skip; all listed in 03)"
                     + (f", {len(over)} of them longer than sft.max_length: {shown}{more}" if over else ""))
    return Check("dataset", "ok", "; ".join(parts) + ".")


def check_benchmark_files(cfg: _config.RunConfig) -> Check:
    """Every local or ``package:`` benchmark file read in full now
    (:func:`medtune.evaluation.multiple_choice.validate`), so a bad file stops the run in 00 instead of in 04 after
    the baseline answers; Hub ids are only checked for shape."""
    from medtune.evaluation import multiple_choice

    if not cfg.benchmarks:
        return Check("benchmarks", "ok", "no multiple-choice benchmarks in this profile.")
    problems = multiple_choice.validate(cfg)
    if problems:
        return Check("benchmarks", "error", "; ".join(problems),
                     "fix the file(s) named, or remove them from the profile's benchmarks section")
    return Check("benchmarks", "ok", f"{', '.join(cfg.benchmarks)}: readable.")


def check_benchmark_languages(cfg: _config.RunConfig) -> Check:
    """Each local or ``package:`` benchmark's script against the language it will be scored in (its own
    ``language``, else the run's): a Chinese set scored with the English prompt, or the reverse, is a warning that
    names the fix (:func:`medtune.evaluation.multiple_choice.language_notes`). Never an error: the run can go on."""
    from medtune.evaluation import multiple_choice

    notes = multiple_choice.language_notes(cfg) if cfg.benchmarks else []
    if notes:
        return Check("benchmarks.language", "warning", " ".join(notes))
    return Check("benchmarks.language", "ok", "each local benchmark is written in the language it is scored in.")


def check_harness(cfg: _config.RunConfig) -> Check:
    """With ``benchmark_harness: true``, lm-eval must import now, not fail in 04 after the baseline answers; says which
    lm-eval task scores each benchmark with its own prompt (:data:`medtune.evaluation.harness.TASKS`)."""
    if not cfg.benchmark_harness:
        return Check("benchmark_harness", "ok", "off: 04/06 score the benchmarks with medtune's own scoring only.")
    from medtune.evaluation import harness

    version = harness.lm_eval_version()
    if version is None:
        return Check("benchmark_harness", "error", "benchmark_harness is true, but lm-eval is not installed.",
                     "make env EXTRAS=harness (or pip install -e '.[harness]', which pins lm-eval 0.4.13), or "
                     "benchmark_harness: false.")
    tasks = ", ".join(f"{name} -> {harness.task_for(name) or 'same-prompt check only'}" for name in cfg.benchmarks)
    return Check("benchmark_harness", "ok", f"lm-eval {version}; {tasks or 'no benchmarks in this profile'}.")


def model_config(cfg: _config.RunConfig):
    """The model's transformers config, from its ``config.json`` only (no weights), or None when not available
    without work (a ``package:`` model not yet converted by 01; it is small).

    Raises:
        medtune.io.sources.SourceError: a remote model's config.json cannot be fetched.
    """
    from medtune.compat import load_config
    from medtune.io import sources

    if sources.parse_source(cfg.model).kind == "package":
        from medtune.stages.data import package_path
        from medtune.stages.modeling import cache_dir

        folder = cache_dir() / "models" / package_path(cfg.model).stem
        return load_config(folder) if (folder / "config.json").is_file() else None
    src = sources.for_model(cfg)
    if src is None:
        return load_config(cfg.model) if (Path(cfg.model) / "config.json").is_file() else None
    folder = src.download(cfg.model, "model", cfg.model_revision, allow_patterns=["config.json"])
    return load_config(folder)


def _free_memory(cfg: _config.RunConfig, single_device: bool) -> tuple[float, str]:
    """(free GiB, where) for the run: one GPU (Llama 4 fast path), all GPUs (device_map="auto"), or system RAM."""
    import torch

    if _uses_gpu(cfg):
        frees = [torch.cuda.mem_get_info(i)[0] / GIB for i in range(torch.cuda.device_count())]
        if single_device or len(frees) == 1:
            return frees[0], f"GPU 0 ({torch.cuda.get_device_name(0)})"
        return sum(frees), f"{len(frees)} GPUs together (device_map=\"auto\")"
    from medtune.stages.hardware import cpu_memory

    return cpu_memory()[1], "system RAM (no GPU used)"


def check_memory(cfg: _config.RunConfig, conf) -> tuple[Check, dict | None]:
    """The training estimate (:func:`estimate_for`) against the free memory of the device(s) the run uses."""
    if conf is None:
        return Check("memory", "skipped", "model config not available yet (a package: model is converted in 01)."), None
    est = estimate_for(cfg, conf)
    llama4 = families.is_llama4(conf)
    fast = llama4 and cfg.llama4_fast
    free, where = _free_memory(cfg, single_device=fast)
    detail = (f"training needs ~{est['total_gib']:,.1f} GiB (weights {est['weights_gib']:,.1f}, LoRA + optimizer "
              f"{est['lora_gib']:,.1f}, activations {est['activations_gib']:,.1f}); free: {free:,.1f} GiB on {where}.")
    if est["total_gib"] <= free:
        return Check("memory", "ok", detail), est
    fixes = []
    if llama4 and not cfg.llama4_fast:
        fixes.append("set llama4_fast: true (NF4 experts + sparse dispatch: Scout fits one H200)")
    if fast and not cfg.quantization.get("bnb_4bit_use_double_quant"):
        fixes.append("set bnb_4bit_use_double_quant: true in the quantization section (-4 GiB on Scout)")
    fixes.append("lower sft.max_length or sft.per_device_train_batch_size")
    if not _uses_gpu(cfg):
        fixes.append("use a GPU machine")
    elif not fast:
        fixes.append("use more GPUs (the walkthrough used 3x H200)")
    return Check("memory", "error", "not enough memory: " + detail, "; or ".join(fixes) + "."), est


def _free_at(path: Path) -> tuple[int, int]:
    """(free bytes, device id) of the filesystem holding ``path`` (its nearest existing parent)."""
    path = Path(path).expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free, os.stat(path).st_dev


def _local_row_count(dataset: str) -> int | None:
    """Non-blank lines of a local or ``package:`` JSONL dataset (an upper bound on its rows), else None."""
    from medtune.io import sources
    from medtune.stages import data

    try:
        ref = sources.parse_source(dataset)
        path = data.package_path(dataset) if ref.kind == "package" else ref.path
        if path is not None and path.is_file() and path.suffix == ".jsonl":
            with path.open("rb") as f:
                return sum(1 for line in f if line.strip())
    except Exception:  # an estimate only: the data check in 03 reports what is wrong with the file
        return None
    return None


def _checkpoint_bytes(cfg: _config.RunConfig, lora_params: int) -> int:
    """Disk for the run's checkpoints: each holds the LoRA weights (fp32) and AdamW's two states (3 x 4 B per
    parameter); their number is steps / ``save_steps`` (steps from ``max_steps``, or ``max_rows`` rows; one
    checkpoint when unknown), at most ``save_total_limit`` + 1 (transformers writes a checkpoint before it deletes the
    oldest, ``Trainer._rotate_checkpoints``)."""
    steps = int(cfg.sft.get("max_steps", -1) or -1)
    rows = cfg.max_rows or _local_row_count(cfg.dataset)
    if steps <= 0 and rows:
        batch = int(_sft(cfg, "per_device_train_batch_size")) * int(cfg.sft.get("gradient_accumulation_steps", 1))
        steps = math.ceil(max(rows - cfg.heldout_size, 1) / batch) * math.ceil(float(_sft(cfg, "num_train_epochs")))
    count = math.ceil(steps / int(_sft(cfg, "save_steps"))) if steps > 0 else 1
    if cfg.sft.get("save_total_limit"):
        count = min(count, int(cfg.sft["save_total_limit"]) + 1)
    return (count + 1) * lora_params * 12  # + the final adapter (and slack)


def check_disk(cfg: _config.RunConfig, conf=None, estimate: dict | None = None) -> Check:
    """Free disk against what the run will write: the model download (sizes from the service's file metadata,
    cached files not counted), Llama 4's NF4 experts cache (``llama4_fast``), the checkpoints in outputs/ and, with
    ``export_merged``, the merged bf16 model there.
    A rehearsal (``rehearsal: true``) downloads no weights and writes no NF4 cache: only the checkpoints count."""
    from medtune.io import sources
    from medtune.settings.runs import outputs_root
    from medtune.stages.modeling import cache_dir, nf4_experts_cache

    needs: list[tuple[str, Path, int]] = []
    if cfg.rehearsal:
        if estimate is None:
            return Check("disk", "ok", "rehearsal: no model download and no NF4 experts cache.")
        conf = None  # no NF4 experts cache either
    src = None if cfg.rehearsal else sources.for_model(cfg)
    checkpoint = Path(cfg.model) if src is None and Path(cfg.model).is_dir() else None  # fingerprints the NF4 cache
    if src is not None:
        listed = src.listing(cfg.model, "model", cfg.model_revision)
        if listed is None:
            return Check("disk", "skipped", "file sizes unknown (HF_HUB_OFFLINE is set): the cached copy is used.")
        ignore, kept = sources.select_model_files(listed)
        cached = src.cached(cfg.model, "model", cfg.model_revision, None, ignore)
        checkpoint = cached
        missing = {f: n for f, n in kept.items() if cached is None or not (cached / f).is_file()}
        needs.append((f"model download ({len(missing)} of {len(kept)} files)", sources.cache_dir(src.kind),
                      sum(missing.values())))
    if conf is not None:
        if families.is_llama4(conf) and cfg.llama4_fast:
            dq = bool(cfg.quantization.get("bnb_4bit_use_double_quant"))
            target = None if checkpoint is None else nf4_experts_cache(cfg, dq, checkpoint)
            if target is None or not (target / "experts-nf4.safetensors").is_file():
                est = estimate or estimate_for(cfg, conf)
                needs.append(("NF4 experts cache", cache_dir(), int(est["params"]["routed_experts"] * _bytes_4bit(dq))))
    if estimate is not None:
        needs.append(("checkpoints + adapter", outputs_root(), _checkpoint_bytes(cfg, estimate["params"]["lora"])))
        if cfg.export_merged:  # 07 saves the base with the LoRA merged in, in bf16 (2 bytes per parameter)
            base = sum(n for k, n in estimate["params"].items() if k != "lora")
            needs.append(("merged model (export_merged)", outputs_root(), base * 2))
    if not needs:
        return Check("disk", "ok", "model is local: nothing to download.")
    by_device: dict[int, list] = {}
    for what, where, n in needs:
        free, dev = _free_at(where)
        by_device.setdefault(dev, [free, []])[1].append((what, where, n))
    lines, short = [], []
    for free, items in by_device.values():
        total = sum(n for _, _, n in items)
        parts = ", ".join(f"{what} {n / 1e9:,.1f} GB at {where}" for what, where, n in items)
        lines.append(f"{parts}: {total / 1e9:,.1f} GB needed, {free / 1e9:,.1f} GB free")
        if total > free:
            short.append(f"free {(total - free) / 1e9:,.1f} GB more on the disk of {items[0][1]}")
    detail = "; ".join(lines) + "."
    if short:
        return Check("disk", "error", "not enough disk: " + detail,
                     "; ".join(short) + ", or point HF_HOME (MODELSCOPE_CACHE), MEDTUNE_CACHE and MEDTUNE_OUTPUTS at a "
                     "larger disk (the walkthrough sized its disk to 300 GB).")
    return Check("disk", "ok", detail)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _requirement(spec: str):
    """``spec`` parsed by ``packaging.requirements.Requirement`` (PEP 508), or None when it does not parse."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return Requirement(spec)
    except InvalidRequirement:
        return None


def _pin(spec: str) -> tuple[str, str] | None:
    """``(name lower-cased, version)`` of an exact pin ``name[extras]==version`` without an environment marker;
    None for anything else (ranges, several specifiers, markers, text that is no requirement)."""
    req = _requirement(spec)
    if req is None or req.marker is not None or len(req.specifier) != 1:
        return None
    (only,) = req.specifier
    return (req.name.lower(), only.version) if only.operator == "==" else None


def _matches(have: str, want: str) -> bool:
    """Whether installed version ``have`` satisfies the pin ``==want`` (PEP 440 via ``packaging``: a local build tag
    such as ``2.13.0+cpu`` matches ``==2.13.0``); plain text comparison when either is no PEP 440 version."""
    from packaging.specifiers import InvalidSpecifier, Specifier
    from packaging.version import InvalidVersion, Version

    try:
        return Specifier(f"=={want}").contains(Version(have), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return have.split("+")[0] == want


def tested_versions(pyproject: Path | None = None) -> dict[str, str]:
    """``{distribution: version}`` pinned with ``==`` in pyproject.toml's dependencies (and in its optional groups,
    for packages that are installed); from the installed medtune's metadata when there is no pyproject.toml.
    Requirements are parsed with ``packaging`` (PEP 508)."""
    from medtune.settings.config import project_root

    path = pyproject or project_root() / "pyproject.toml"
    specs: list[str] = []
    if path.is_file():
        import tomllib

        project = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {})
        if project.get("name") == "medtune":
            specs = list(project.get("dependencies", []))
            specs += [s for group in project.get("optional-dependencies", {}).values() for s in group]
    if not specs:
        specs = [s.split(";")[0] for s in (importlib.metadata.requires("medtune") or [])]
    pins: dict[str, str] = {}
    for spec in specs:
        pin = _pin(spec)
        if pin:
            pins[pin[0]] = pin[1]
    return pins


def check_versions(pyproject: Path | None = None, required: set[str] | None = None) -> Check:
    """Installed versions (``importlib.metadata``) against :func:`tested_versions`. A difference is a warning
    listing package, installed and tested version; a local build tag (``2.13.0+cpu``) is not a difference
    (:func:`_matches`)."""
    from medtune.settings.config import project_root

    path = pyproject or project_root() / "pyproject.toml"
    pins = tested_versions(path)
    base: set[str] = set()
    if path.is_file():
        import tomllib

        deps = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {}).get("dependencies", [])
        base = {req.name.lower() for req in map(_requirement, deps) if req is not None}
    required = base if required is None else required
    off = []
    for name, want in sorted(pins.items()):
        have = _version(name)
        if have is None:
            if name in required:
                off.append((name, "not installed", want))
        elif not _matches(have, want):
            off.append((name, have, want))
    if not pins:
        return Check("versions", "skipped", "no tested versions found (pyproject.toml or medtune's metadata).")
    if not off:
        return Check("versions", "ok", f"{len(pins)} pinned packages at their tested versions.")
    listing = ", ".join(f"{n} {have} (tested {want})" for n, have, want in off)
    return Check("versions", "warning", f"not the tested versions: {listing}.",
                 "`make env` installs the tested set; other versions may work but are not tested (see FIELD-NOTES.md "
                 "for known breakages).")


# ----------------------------------------------------------------------------------------------------------------
# All of it
# ----------------------------------------------------------------------------------------------------------------

def run(cfg: _config.RunConfig, *, access: dict | None = None, rows: bool = True) -> dict:
    """Every preflight check, in order of cost; prints one line per check and raises once with all failures.

    Args:
        cfg: the run's settings.
        access: the result of :func:`medtune.stages.auth.check_access` if it was called already (notebook 00), else
            None.
        rows: read and split the dataset and count its tokens with the profile's tokenizer
            (:func:`check_dataset_file`; the tokenizer files are downloaded for a Hub model); False where that was
            done already (01, after 00).

    Returns:
        ``{"ok": True, "checks": [{"name", "status", "detail", "fix"}], "estimate": {...} or None}``, for
        ``metrics.json`` (no token, ever).

    Raises:
        PreflightError: one or more checks failed; the message lists each with its fix.
    """
    from medtune.io import sources

    checks = check_settings(cfg)
    checks.append(check_tokens())
    checks.append(check_push(cfg))
    checks.append(check_benchmark_files(cfg))
    checks.append(check_benchmark_languages(cfg))
    checks.append(check_harness(cfg))
    access_check, status = check_access(cfg, access)
    checks.append(access_check)
    if rows:
        checks.append(_check_rows(cfg, access_ok=access_check.status != "error"))
    conf = estimate = None
    if access_check.status != "error":
        try:
            conf = model_config(cfg)
        except (sources.SourceError, ValueError) as err:  # ValueError: a config value transformers refuses
            checks.append(Check("memory", "error", f"cannot read the model's config.json: {err}"))
    if conf is not None and _packing(cfg):
        checks.append(check_packing(cfg, conf))
    if cfg.rehearsal and access_check.status != "error" and not any(c.name == "memory" for c in checks):
        checks.append(_check_rehearsal(cfg, conf))
    if access_check.status != "error" and not any(c.name in ("memory", "rehearsal") for c in checks):
        mem, estimate = check_memory(cfg, conf)
        checks.append(mem)
    if access_check.status != "error":
        try:
            checks.append(check_disk(cfg, conf, estimate))
        except sources.SourceError as err:
            checks.append(Check("disk", "error", f"cannot list the model's files: {err}"))
    checks.append(check_versions())
    for c in checks:
        print(f"{_MARK[c.status]:<5} {c.name}: {c.detail}" + (f"\n      fix: {c.fix}" if c.fix else ""))
    failed = [c for c in checks if c.status == "error"]
    if failed:
        raise PreflightError(failed)
    return {"ok": True, "checks": [dataclasses.asdict(c) for c in checks], "estimate": estimate}


def _packing(cfg: _config.RunConfig) -> bool:
    """TRL packs rows into one sequence: ``sft.padding_free``, or ``sft.packing`` with a best-fit strategy."""
    return bool(cfg.sft.get("padding_free")) or bool(cfg.sft.get("packing"))


def check_packing(cfg: _config.RunConfig, conf) -> Check:
    """Packed rows stay apart in this model (:func:`medtune.llama4.check_packing` for Llama 4; other models as
    transformers' packed-sequence masks keep them)."""
    from medtune import families
    from medtune.stages.data import sft_max_length

    max_length = sft_max_length(cfg)
    if families.is_llama4(conf):
        from medtune import llama4

        try:
            llama4.check_packing(conf, max_length)
        except ValueError as err:
            detail, _, fix = str(err).partition(" Set ")
            return Check("sft.packing", "error", detail, "Set " + fix if fix else "")
    return Check("sft.packing", "ok", f"rows packed into sequences of up to {max_length} tokens, positions restarting "
                                      "per row (TRL padding-free): more rows per optimizer step than one per row")


def _check_rehearsal(cfg: _config.RunConfig, conf) -> Check:
    """``rehearsal: true`` on a model that is Llama 4 (its config.json read by :func:`model_config`)."""
    from medtune.stages.modeling import check_rehearsal

    try:
        check_rehearsal(cfg, getattr(conf, "model_type", "") if conf is not None else "")
    except _config.ConfigError as err:
        fix = str(err).split(" Fix: ", 1)
        return Check("rehearsal", "error", fix[0], fix[1] if len(fix) > 1 else "")
    return Check("rehearsal", "ok", f"random weights of {cfg.model} ({conf.model_type}), built in 01/04/05/06: "
                                    "the answers and scores of this run are meaningless.")


_MARK = {"ok": "OK", "warning": "WARN", "error": "FAIL", "skipped": "SKIP"}


def _check_rows(cfg: _config.RunConfig, access_ok: bool) -> Check:
    """:func:`check_dataset_file` with the profile's tokenizer (none when it cannot be had: the model is remote and
    the access check failed, or its tokenizer files fail to load; the check then says so and 03 counts tokens)."""
    from medtune.io import sources
    from medtune.stages import modeling

    tokenizer, why = None, ""
    if access_ok or sources.for_model(cfg) is None:
        try:
            tokenizer = modeling.profile_tokenizer(cfg)
        except (sources.SourceError, OSError, ValueError) as err:
            why = f"; the tokenizer did not load ({type(err).__name__}: {str(err)[:200]}), so 03 counts the tokens"
    check = check_dataset_file(cfg, tokenizer, remote=access_ok)
    check.detail = check.detail.rstrip(".") + why + "." if why else check.detail
    return check
