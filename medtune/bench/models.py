"""Scout-shaped models with random weights, built on the GPU layer by layer, for the benchmarks.

Nothing is downloaded: the dimensions are Llama 4 Scout's text config (``medtune.llama4.SCOUT_TEXT_DIMS``). The layers
come from :mod:`medtune.llama4.synthetic`, the builder the rehearsal (``rehearsal: true``) uses too.
"""

from __future__ import annotations

import datetime as dt
import gc

import torch
import torch.nn as nn

from medtune import llama4 as l4
from medtune.llama4 import synthetic

GIB = 2**30
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(layers: int, setup: str, *, double_quant: bool = False, device="cuda"):
    """Scout-shaped ``Llama4ForCausalLM`` with ``layers`` decoder layers, built layer by layer on ``device``.

    Returns (model, weights GiB of one decoder layer). ``setup`` is ``walkthrough`` or ``medtune`` (module doc).
    """
    from transformers import Llama4ForCausalLM
    from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm, Llama4TextRotaryEmbedding

    config = l4.scout_text_config(num_hidden_layers=layers, attn_implementation="sdpa")
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    gen = torch.Generator(device).manual_seed(0)

    with torch.device(device):
        emb = nn.Embedding(config.vocab_size, config.hidden_size, dtype=torch.bfloat16)
        model.model.embed_tokens = synthetic.init_random_(emb, gen)
        head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=torch.bfloat16)
        model.lm_head = synthetic.init_random_(head, gen)
        model.model.norm = Llama4TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(torch.bfloat16)
        model.model.rotary_emb = Llama4TextRotaryEmbedding(config)
    layer_gib = 0.0
    for i in range(layers):
        layer = synthetic.random_decoder_layer(config, i, device=device, generator=gen, double_quant=double_quant,
                                               nf4_experts=setup == "medtune")
        model.model.layers[i] = layer
        layer_gib = l4.weights_gib(layer)
    if setup == "medtune":  # nothing left to convert; registers the decoder-layer hooks (recompute skip)
        l4.prepare_llama4_for_qlora(model, double_quant=double_quant)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on meta: {meta[:3]}")
    model.requires_grad_(False)
    return model, layer_gib


def add_lora_and_head(model, *, expert_r: int | None = None):
    """LoRA r=64/alpha=16 on LORA_TARGETS, gradient checkpointing, TRL's fused LM head (as SFTTrainer).

    ``expert_r``: also LoRA of that rank on the routed experts' gate_up/down (PEFT ``target_parameters``, as
    params/scout.yaml's commented example: ``rank_pattern`` gives the experts their own rank)."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from medtune.compat import apply_llama4_trl_fixes

    apply_llama4_trl_fixes(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    experts = {}
    if expert_r:
        experts = dict(target_parameters=list(l4.ROUTED_EXPERT_PARAMETERS),
                       rank_pattern={r"feed_forward\.experts\.(gate_up|down)_proj": expert_r})
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
                      **experts)
    return get_peft_model(model, lora)


def free() -> None:
    """Return cached blocks after the caller dropped its references."""
    gc.collect()
    torch.cuda.empty_cache()


def environment() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return dict(date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__, bitsandbytes=bitsandbytes.__version__,
                nf4_dequant_group=l4.Llama4NF4Experts.dequant_group or "all",
                skip_recompute=l4.Llama4SparseMoe.skip_recompute)
