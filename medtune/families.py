"""Which model family a model is: the one place that decides "is this Llama 4".

Every part of medtune that treats Llama 4 differently (the NF4-expert loader, the memory estimate, the static-cache
decoder, the LoRA checks before training, the model card) asks :func:`is_llama4`, from whatever it holds: a model
(bare or PEFT-wrapped), a transformers config, the dict of a ``config.json``, or a ``model_type`` string. Only where
no config is at hand (the model card of a Hub base that was never downloaded here) is the repo id read instead,
by :func:`is_llama4_repo_id`.

Light on purpose: no torch, no transformers, no medtune import, so the preflight checks and the model card can ask
without loading the model stack (``import medtune.llama4`` takes seconds: torch, Triton, transformers' Llama 4).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["LLAMA4_MODEL_TYPES", "ROUTED_EXPERT_PARAMETERS", "is_llama4", "is_llama4_repo_id"]

# ``model_type`` of Llama 4 configs in transformers 5.23: the multimodal checkpoint (Scout's config.json,
# ``Llama4Config``) and its text model (``Llama4TextConfig``, also the ``text_config`` of the former).
LLAMA4_MODEL_TYPES = ("llama4", "llama4_text")

# Llama 4's routed experts as PEFT ``target_parameters`` name them: the fused 3-D parameters of
# transformers' ``Llama4TextExperts`` (gate_up_proj (E, H, 2I), down_proj (E, I, H)), modeling_llama4.py 5.23.
ROUTED_EXPERT_PARAMETERS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")

# transformers' model_type names: lower case, digits, "_" and "-" ("llama4_text", "xlm-roberta"); "" when unknown.
_MODEL_TYPE = re.compile(r"[a-z0-9_-]*")


def is_llama4(model_or_config) -> bool:
    """True for Llama 4 (``model_type`` in :data:`LLAMA4_MODEL_TYPES`).

    Args:
        model_or_config: one of
            - a ``model_type`` string (``"llama4"``, ``"llama4_text"``, ``"llama"``; ``""`` for unknown);
            - a config dict, as read from a ``config.json`` (its ``model_type``; a ``text_config`` dict is looked at
              too when the top level is not Llama 4);
            - a transformers config (``model_type``; its ``text_config`` likewise);
            - a model, bare or PEFT-wrapped (its ``config``).

    Returns:
        Whether it is a Llama 4 model or config.

    Raises:
        ValueError: a string that is not a ``model_type`` (a repo id or a path: read its config first, e.g.
            :func:`medtune.stages.modeling.is_llama4` for a checkpoint, or :func:`is_llama4_repo_id` for an id).
        TypeError: anything else (None, a number, an object with neither ``model_type`` nor ``config``).
    """
    if isinstance(model_or_config, str):
        if not _MODEL_TYPE.fullmatch(model_or_config):
            raise ValueError(
                f"is_llama4: {model_or_config!r} is not a model_type (such as 'llama4' or 'llama'). For a checkpoint "
                "folder or repo id read its config first (medtune.stages.modeling.is_llama4(path)); for a repo id "
                "with no config at hand use medtune.families.is_llama4_repo_id."
            )
        return model_or_config in LLAMA4_MODEL_TYPES
    if isinstance(model_or_config, Mapping):
        if "model_type" not in model_or_config and "text_config" not in model_or_config:
            raise TypeError(f"is_llama4: a config dict needs a 'model_type' key; got keys {sorted(model_or_config)}")
        top, text = model_or_config.get("model_type"), model_or_config.get("text_config")
    else:
        inner = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
        if hasattr(inner, "config"):  # a model (PEFT's wrapper unwrapped first)
            return is_llama4(inner.config)
        if not hasattr(inner, "model_type"):
            raise TypeError(
                "is_llama4 takes a model, a config, a config dict or a model_type string; got "
                f"{type(model_or_config).__name__}"
            )
        top, text = inner.model_type, getattr(inner, "text_config", None)  # a transformers config
    if isinstance(top, str) and top in LLAMA4_MODEL_TYPES:
        return True
    return text is not None and is_llama4(text)


def is_llama4_repo_id(repo_id: str | None) -> bool:
    """Whether a Hub or ModelScope repo id names a Llama 4 checkpoint, from the id alone.

    For where no config is at hand (the model card of a base model that was never downloaded on this machine).
    Meta's Llama 4 repos and their copies are named ``Llama-4-...`` (``meta-llama/Llama-4-Scout-17B-16E-Instruct``,
    ModelScope's ``LLM-Research/Llama-4-Scout-17B-16E-Instruct``); the test is that fragment, case-insensitive. A
    config, where there is one, is the better witness: :func:`is_llama4`.

    Args:
        repo_id: ``owner/name``, or None (no id known: False).

    Returns:
        True when the id contains ``llama-4`` (any case).
    """
    return "llama-4" in (repo_id or "").lower()
