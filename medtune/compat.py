"""Workarounds for library bugs, all in one place. Each names the versions it was seen with and how to tell it is
no longer needed (tests/llama4/test_compat.py holds a test per workaround that fails once upstream fixes the bug).

TRL 1.16 ``SFTTrainer`` + Llama 4 (seen 2026-11-29 with transformers 5.23.0, trl 1.16.0)
=========================================================================================
``SFTTrainer`` patches the model with ``trl.trainer.utils.add_fused_lm_head``: its forward runs
``model.base_model(...)``, reads ``.last_hidden_state`` and projects it through the LM head in tiles. Two
assumptions in that path do not hold for Llama 4:

(a) ``model.base_model`` is the decoder backbone. transformers' ``PreTrainedModel.base_model`` is
    ``getattr(self, self.base_model_prefix, self)``. ``Llama4ForCausalLM.base_model_prefix`` is
    ``"language_model"`` (so that it loads the text weights out of the multimodal checkpoint's
    ``language_model.*`` keys) while its backbone attribute is ``model``; ``Llama4ForConditionalGeneration``'s
    prefix is ``"model"`` but it has no such attribute (every other transformers 5 VLM has a ``XModel`` there that
    merges image features and runs the decoder). Both fall back to the model itself, whose output has logits and
    no ``last_hidden_state`` -> ``AttributeError: 'MoeCausalLMOutputWithPast' object has no attribute
    'last_hidden_state'`` (``Llama4CausalLMOutputWithPast`` for the multimodal class) at the first step.
    Fix, per model instance: give ``base_model`` the backbone the convention expects (the text decoder for
    ``Llama4ForCausalLM``; for ``Llama4ForConditionalGeneration`` a small callable that does the model's own
    image-feature merge and then runs the text decoder). The class attribute is left alone, so loading is
    unchanged.
(b) ``config.num_experts``. TRL's MoE load-balancing loss (on by default: Llama 4's config has
    ``router_aux_loss_coef=0.001``) reads ``text_config.num_experts``; Llama 4 calls it ``num_local_experts`` and,
    unlike Mixtral's config, declares no ``attribute_map`` alias -> ``AttributeError: 'Llama4TextConfig' object
    has no attribute 'num_experts'``. Fix: add the alias Mixtral already has (``num_experts`` ->
    ``num_local_experts``) to ``Llama4TextConfig.attribute_map``. Class-wide, read-only alias, nothing is
    serialized.

Upstream: no issue or PR for either Llama 4 case was found (searched the GitHub issues corpus, 2026-11-29).
TRL's own code carries the same ``num_experts`` workaround for GPT-OSS (trl issue #5754), which is how (b) was
recognised.

bitsandbytes 0.50.2 4-bit Linears on CPUs with AVX512-BF16 (seen 2026-12-06, bitsandbytes 0.50.2, torch 2.13.0 CPU)
======================================================================================================
``Linear4bit.forward`` on such a CPU, in eval mode without gradients, repacks the layer's NF4 weight in place into a
CPU-kernel layout (``functional._convert_weight_packed_for_cpu``, flagged by ``quant_state.packing_format_for_cpu``)
and never packs it back. A later training forward then multiplies with the repacked bytes: the smoke test's held-out
loss went from 2.74 to 16.90 after 4 SFT steps that followed a held-out evaluation in the same process (it falls
without the repacking), and Linears narrower than 64 inputs fail outright (absmax reshaped to ``[K, 0]``). Fix,
per model instance: :func:`keep_cpu_4bit_weights_unpacked` turns the repacking off
(``support_avx512bf16_for_cpu = False``), so CPU inference uses bitsandbytes' generic 4-bit path, as on CPUs
without AVX512-BF16. Upstream: not reported as of 2026-12-06 (bitsandbytes' issues corpus searched for
"packing_format_for_cpu").

transformers 5.23 strict configs + Llama 4 config.json files re-saved by transformers 4.51.x (seen 2026-12-06)
=============================================================================================================
Some copies of Scout's config.json (files re-saved by transformers 4.51.x) hold ``"attn_temperature_tuning": 4``;
transformers 4.51 used the value only as a truth value (temperature tuning on the NoPE layers). transformers
5.23's ``Llama4TextConfig`` is a strict dataclass that types the field ``bool`` and refuses the integer:
``StrictDataclassFieldValidationError: Field 'attn_temperature_tuning' expected bool, got int (value: 4)`` before
any weight is read, and ``from_pretrained`` re-reads config.json itself. Fix: :func:`load_config` reads the raw
config dict, turns each known legacy value into what 5.23 expects (:data:`LEGACY_CONFIG_VALUES`: an integer
``attn_temperature_tuning`` becomes its truth value, as 4.51 read it), builds the config from the cleaned dict,
and the loaders pass that config to ``from_pretrained``. A value it does not know how to clean is refused with the
key and the fix. Upstream: no transformers issue found for it (issues corpus searched for
"attn_temperature_tuning", 2026-12-06).

Note on the loss: with (b) fixed, TRL adds Mixtral's softmax load-balancing loss x 0.001 to the SFT loss of a
Llama 4 model (whose router is a sigmoid top-1). transformers' own ``Llama4ForCausalLM.forward`` adds no
auxiliary loss, nor did the walkthrough's trainer. Pass ``SFTConfig(router_aux_loss_coef=0.0)`` to train on the
language-model loss alone.
"""

from __future__ import annotations

import logging

import torch
from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

logger = logging.getLogger(__name__)

__all__ = ["LEGACY_CONFIG_VALUES", "apply_llama4_trl_fixes", "Llama4MultimodalBackbone",
           "cpu_adapters_in_compute_dtype", "keep_cpu_4bit_weights_unpacked", "load_config", "normalize_legacy_config"]

# Llama4TextConfig.attribute_map as transformers ships it, kept so that tests can show the bug without the fix.
ORIGINAL_LLAMA4_TEXT_ATTRIBUTE_MAP: dict[str, str] = dict(Llama4TextConfig.attribute_map)
_BACKBONE_ATTR = "_medtune_backbone"


class Llama4MultimodalBackbone:
    """What ``Llama4ForConditionalGeneration.base_model`` should be: the multimodal backbone without the LM head.

    Calling it does what ``Llama4ForConditionalGeneration.forward`` does before its LM head (transformers 5.23,
    modeling_llama4.py): embed ``input_ids``, encode ``pixel_values`` with the vision tower, project them and
    scatter them into the image-placeholder positions, then run the text decoder (``language_model.model``).

    It is deliberately not an ``nn.Module``: it owns no weights (it holds a reference to the model), so it adds
    nothing to ``state_dict``, ``parameters()`` or ``modules()``.

    Returns (from ``__call__``): ``MoeModelOutputWithPast`` with ``last_hidden_state`` (batch, seq, hidden) in the
    model's dtype, and ``router_logits`` when called with ``output_router_logits=True``.

    Raises:
        ValueError: neither or both of ``input_ids`` and ``inputs_embeds`` given; image features and image tokens
            do not match (raised by transformers' ``get_placeholder_mask``).
    """

    _tp_plan = None  # read by PreTrainedModel.supports_tp_plan through base_model
    _pp_plan = None

    def __init__(self, model: Llama4ForConditionalGeneration):
        self.model = model

    def get_image_features(self, *args, **kwargs):
        """The model's own ``get_image_features`` (generation looks it up on ``base_model``)."""
        return self.model.get_image_features(*args, **kwargs)

    def get_decoder(self):
        """The text decoder, ``language_model.model`` (a ``Llama4TextModel``)."""
        return self.model.language_model.model

    def get_input_embeddings(self):
        """The token embedding of the text decoder."""
        return self.model.get_input_embeddings()

    def __call__(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        vision_feature_select_strategy: str | None = None,  # accepted and ignored, like the model's forward
        **kwargs,
    ):
        model = self.model
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)
        image = (mm_encoder_outputs or {}).get("image")
        if image is None and pixel_values is not None:
            image = model.get_image_features(pixel_values=pixel_values, return_dict=True)
        if image is not None:
            features = image.last_hidden_state
            projected = model.multi_modal_projector(features.view(-1, features.size(-1)))
            projected = projected.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=projected)
            inputs_embeds = inputs_embeds.masked_scatter(mask, projected)
        for key in ("output_attentions", "output_hidden_states", "return_dict"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return model.language_model.model(inputs_embeds=inputs_embeds, **kwargs)

    forward = __call__


def _unwrap(model):
    """The transformers model under PEFT / accelerate wrappers."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return getattr(model, "module", model)  # DDP


def apply_llama4_trl_fixes(model):
    """Make a Llama 4 model train under TRL 1.16 ``SFTTrainer`` (fixes (a) and (b) of this module's docstring).

    Call it before ``SFTTrainer(...)`` (or any time before ``train()``). Idempotent; a no-op (one log line) for
    models that are not Llama 4.

    Args:
        model: ``Llama4ForCausalLM`` or ``Llama4ForConditionalGeneration``, bare or wrapped by PEFT.

    Returns:
        The same ``model`` object.

    Effects: (a) on the model instance only: ``Llama4ForCausalLM`` gets ``base_model_prefix = "model"`` (so
    ``base_model`` is its ``Llama4TextModel``); ``Llama4ForConditionalGeneration`` gets a
    :class:`Llama4MultimodalBackbone` as ``base_model``. (b) process-wide: ``Llama4TextConfig.attribute_map``
    gains ``num_experts -> num_local_experts``.
    """
    inner = _unwrap(model)
    if not isinstance(inner, (Llama4ForCausalLM, Llama4ForConditionalGeneration)):
        logger.info("apply_llama4_trl_fixes: %s is not a Llama 4 model; nothing to do", type(inner).__name__)
        return model
    if "num_experts" not in Llama4TextConfig.attribute_map:
        Llama4TextConfig.attribute_map = {**Llama4TextConfig.attribute_map, "num_experts": "num_local_experts"}
    if isinstance(inner, Llama4ForCausalLM):
        inner.base_model_prefix = "model"
    else:
        if not isinstance(getattr(inner, _BACKBONE_ATTR, None), Llama4MultimodalBackbone):
            # A plain attribute, not a registered submodule: no weights, nothing in state_dict.
            object.__setattr__(inner, _BACKBONE_ATTR, Llama4MultimodalBackbone(inner))
        inner.base_model_prefix = _BACKBONE_ATTR
    return model


# ----------------------------------------------------------------------------------------------------------------
# TRL 1.16 casts LoRA adapters of quantized models to bf16, also on CPU (seen 2026-11-29, trl 1.16.0)
# ----------------------------------------------------------------------------------------------------------------
# SFTTrainer.__init__ (trl/trainer/sft_trainer.py, "When using QLoRA, the PEFT adapter weights are converted to bf16",
# citing the QLoRA paper and peft issue #2889) sets every trainable parameter of a quantized model to bf16. On a GPU
# that is the QLoRA recipe. On a CPU without bf16 units (AVX2 only, like the 2-core machines this project's default
# profile and CI run on) bf16 matmuls are emulated: measured on this project's smoke profile (SmolLM2-135M NF4,
# LoRA r=64, 4 steps), 388 s with bf16 adapters vs 66 s after casting them back to fp32, same loss to 1e-5.
# No upstream issue found for the CPU case.

def cpu_adapters_in_compute_dtype(trainer) -> int:
    """On CPU, put the trainable (LoRA) parameters back in the model's compute dtype after SFTTrainer cast them to bf16.

    Call right after ``SFTTrainer(...)``. No-op on CUDA (bf16 adapters are the QLoRA recipe there) and when the
    compute dtype is bf16 anyway.

    Args:
        trainer: a ``trl.SFTTrainer`` whose model is a PEFT model.

    Returns:
        The number of parameter tensors cast (0 when nothing was done).
    """
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or params[0].device.type != "cpu":
        return 0
    quant = getattr(_unwrap(model).config, "quantization_config", None)
    compute = (getattr(quant, "bnb_4bit_compute_dtype", None) if quant is not None and not isinstance(quant, dict)
               else None)
    if isinstance(quant, dict):
        compute = quant.get("bnb_4bit_compute_dtype")
    if isinstance(compute, str):
        compute = getattr(torch, compute.removeprefix("torch."), None)
    target = compute if isinstance(compute, torch.dtype) else torch.float32
    if target == torch.bfloat16:
        return 0
    n = 0
    for p in params:
        if p.dtype == torch.bfloat16:
            p.data = p.data.to(target)
            n += 1
    return n


def keep_cpu_4bit_weights_unpacked(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPUs with AVX512-BF16 (module doc); in place.

    Args:
        model: any model (PEFT-wrapped or not); its ``bitsandbytes.nn.Linear4bit`` modules are changed.

    Returns:
        The number of Linear4bit modules whose repacking was on and is now off (0 on other CPUs, and on a second
        call).
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


# (config key, test of the legacy value, conversion to the value transformers 5.23 expects)
LEGACY_CONFIG_VALUES = (
    ("attn_temperature_tuning", lambda v: isinstance(v, int) and not isinstance(v, bool), bool),
)


def normalize_legacy_config(config_dict: dict) -> list[str]:
    """Clean, in place, the legacy values of :data:`LEGACY_CONFIG_VALUES` in a raw config dict (top level and its
    ``text_config``/``vision_config``). Returns the keys changed, as ``"text_config.attn_temperature_tuning: 4 ->
    True"`` lines (empty when none)."""
    changed = []
    for prefix, d in (("", config_dict), ("text_config.", config_dict.get("text_config")),
                      ("vision_config.", config_dict.get("vision_config"))):
        if not isinstance(d, dict):
            continue
        for key, is_legacy, convert in LEGACY_CONFIG_VALUES:
            if key in d and is_legacy(d[key]):
                new = convert(d[key])
                changed.append(f"{prefix}{key}: {d[key]!r} -> {new!r}")
                d[key] = new
    return changed


def load_config(source, **kwargs):
    """``AutoConfig.from_pretrained(source, **kwargs)``, with the legacy values of checkpoints saved by older
    transformers cleaned first (module doc; :func:`normalize_legacy_config`). Pass the result to
    ``from_pretrained(..., config=...)`` so that transformers does not re-read the raw file.

    Args:
        source: a local folder with config.json, or a repo id (config file only).
        kwargs: ``revision``, ``token``... as ``AutoConfig.from_pretrained`` takes them.

    Returns:
        A transformers ``PreTrainedConfig``.

    Raises:
        ValueError: config.json holds a value transformers refuses that this function does not know how to clean;
            the message names the file, the key and the fix.
        OSError: no config.json at ``source`` (transformers' error).
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except StrictDataclassError as err:
        raw, _ = PretrainedConfig.get_config_dict(source, **kwargs)
        changed = normalize_legacy_config(raw)
        if not changed:
            raise ValueError(f"{source}/config.json: transformers refuses a value in it ({err}). Edit that key in "
                             f"config.json to the type named above, or use a checkpoint saved by a recent "
                             f"transformers.") from err
        logger.warning("%s/config.json: legacy values cleaned for transformers 5: %s", source, "; ".join(changed))
        model_type = raw.pop("model_type", None)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"{source}/config.json: unknown model_type {model_type!r}") from err
        return CONFIG_MAPPING[model_type].from_dict(raw)
