"""Llama 4 models with random weights, built at full size layer by layer straight into 4-bit on the device.

Used by the rehearsal (``rehearsal: true``: the whole pipeline on the named model's architecture before its
checkpoint is downloaded, :func:`build_random_llama4`) and by the GPU benchmarks (``medtune.bench.models``). A
decoder layer is built in the compute dtype on the device, its ``nn.Linear`` layers are quantized to bitsandbytes
NF4 and its routed experts to :class:`medtune.llama4.Llama4NF4Experts` before the next layer is built, so the
bf16 model never exists as a whole: the peak is the 4-bit model plus one bf16 decoder layer (Scout: ~3.9 GiB).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medtune import llama4 as l4

INIT_STD = 0.02  # Llama 4 configs' initializer_range


def quantize_linears(module: nn.Module, *, double_quant: bool, compute_dtype: torch.dtype = torch.bfloat16,
                     skip: tuple = ()) -> None:
    """Replace every plain ``nn.Linear`` under ``module`` by a bitsandbytes NF4 ``Linear4bit``, in place.

    Quantized on the Linear's device, as transformers' bitsandbytes integration does (it, too, converts only
    ``type(m) is nn.Linear``: Llama 4's router, an ``nn.Linear`` subclass, stays in the compute dtype).

    Args:
        module: any module; its Linears may be on CPU or GPU.
        double_quant: quantize the absmax statistics too (bitsandbytes ``compress_statistics``).
        compute_dtype: the dtype the 4-bit Linears compute in (bf16 on GPU; the CPU profiles use float32).
        skip: child names (``"lm_head"``, which transformers keeps unquantized) or modules left as they are.
    """
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if name in skip or any(child is s for s in skip if isinstance(s, nn.Module)):
            continue
        if type(child) is nn.Linear:
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=double_quant, blocksize=64).to(child.weight.device)
            if child.bias is not None:
                q.bias = child.bias
            setattr(module, name, q)
        else:
            quantize_linears(child, double_quant=double_quant, compute_dtype=compute_dtype, skip=skip)


def init_random_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fill ``module``'s parameters with N(0, 0.02) draws from ``generator``, in place; RMSNorm weights stay as
    their constructor made them (ones), so activations keep their scale through the layers. Returns ``module``."""
    norms = {id(p) for m in module.modules() if "RMSNorm" in type(m).__name__ for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in norms:
                p.normal_(0.0, INIT_STD, generator=generator)
    return module


def random_decoder_layer(config, index: int, *, device, generator: torch.Generator, double_quant: bool,
                         compute_dtype: torch.dtype = torch.bfloat16, nf4_experts: bool = True) -> nn.Module:
    """One ``Llama4TextDecoderLayer`` with random weights on ``device``: 4-bit Linears, sparse MoE dispatch and (with
    ``nf4_experts``) NF4 routed experts.

    Args:
        config: a ``Llama4TextConfig``. index: the layer's index (attention chunking and NoPE depend on it).
        device: where it is built. generator: a ``torch.Generator`` on ``device`` (seeded: same weights each call).
        double_quant: as for :func:`quantize_linears`. compute_dtype: the layer's dtype.
        nf4_experts: quantize the routed experts to :class:`medtune.llama4.Llama4NF4Experts`; False keeps them
            bf16 with transformers' dense dispatch (the walkthrough's setup, for the benchmarks).

    Returns:
        The layer; transiently it held its bf16 weights (Scout: ~3.9 GiB).
    """
    from transformers.models.llama4.modeling_llama4 import Llama4TextDecoderLayer, Llama4TextMoe

    with torch.device(device):
        layer = init_random_(Llama4TextDecoderLayer(config, index).to(compute_dtype), generator)
    quantize_linears(layer, double_quant=double_quant, compute_dtype=compute_dtype)
    if nf4_experts and isinstance(layer.feed_forward, Llama4TextMoe):
        l4.prepare_moe(layer.feed_forward, double_quant=double_quant, compute_dtype=compute_dtype)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return layer


def build_random_llama4(config, *, device="cuda", compute_dtype: torch.dtype = torch.bfloat16,
                        double_quant: bool = False, seed: int = 0):
    """The model of a Llama 4 ``config`` at full size with random weights, as :func:`medtune.llama4.load_llama4_qlora`
    would load its checkpoint: 4-bit NF4 Linears (bf16 ``lm_head``, router and norms), NF4 routed experts, sparse
    dispatch, prepared by :func:`medtune.llama4.prepare_llama4_for_qlora`. Nothing is read or written but memory.

    The model is made on the meta device, then each decoder layer is built by :func:`random_decoder_layer`; the rest
    (embeddings, vision tower, projector, LM head: ~4 GiB bf16 for Scout) is materialized module by module with
    transformers' own initialization (rotary tables computed, not random), its Linears quantized like the layers'.
    The same ``seed`` and device give the same weights, so notebooks that rebuild the model (04, 05, 06) agree.

    Args:
        config: a ``Llama4Config`` (``Llama4ForConditionalGeneration``, as Scout) or ``Llama4TextConfig``
            (``Llama4ForCausalLM``).
        device: where the model is built (``"cuda"``, ``"cpu"``).
        compute_dtype: dtype of the unquantized weights and of the 4-bit compute.
        double_quant: quantize the NF4 absmax statistics too.
        seed: seed of the random weights.

    Returns:
        The model, in eval mode; as from a checkpoint, its 4-bit weights are frozen and the rest is not.

    Raises:
        ValueError: ``config`` is not a Llama 4 config. RuntimeError: a tensor was left on the meta device.
    """
    from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration

    if not l4.is_llama4(config):
        raise ValueError(f"build_random_llama4 builds Llama 4 only; model_type {config.model_type!r}")
    cls = Llama4ForConditionalGeneration if config.model_type == "llama4" else Llama4ForCausalLM
    text_config = config.get_text_config()
    with torch.device("meta"):
        model = cls(config)
    layers = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)
                  and type(m[0]).__name__ == "Llama4TextDecoderLayer")
    generator = torch.Generator(device).manual_seed(seed)
    for i in range(len(layers)):
        layers[i] = random_decoder_layer(text_config, i, device=device, generator=generator,
                                         double_quant=double_quant, compute_dtype=compute_dtype)
    inside_layers = {id(m) for m in layers.modules()}
    for module in list(model.modules()):
        if id(module) in inside_layers:
            continue
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not any(t.is_meta for t in own):
            continue
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            model._init_weights(module)  # rotary tables, norms, embeddings, vision class/position embeddings
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(compute_dtype)
                    if not ("RMSNorm" in type(module).__name__ or "LayerNorm" in type(module).__name__):
                        p.normal_(0.0, INIT_STD, generator=generator)
    quantize_linears(model, double_quant=double_quant, compute_dtype=compute_dtype, skip=("lm_head", layers))
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on the meta device: {meta[:3]}")
    l4.prepare_llama4_for_qlora(model, sparse_moe=True, quantize_experts=False, double_quant=double_quant,
                                compute_dtype=compute_dtype)
    return model.eval()
