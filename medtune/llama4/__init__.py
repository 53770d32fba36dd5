"""What is Llama 4 specific: sparse top-k expert dispatch, NF4 routed experts, and a loader that fits Scout on one GPU.

Why (../shared/notes/FIELD-NOTES.md, measured on one H200):

- transformers' ``Llama4TextMoe.forward`` runs every token through all 16 routed experts and zeroes the
  unselected ones: with Scout's top-1 routing, 15/16 of the expert FLOPs are wasted (51.8 ms vs 7.6 ms per
  layer's expert block, forward + backward, 4,096 tokens). :class:`Llama4SparseMoe` sends each token only
  through its top-k experts; same function, same gradients.
- The routed experts are fused 3-D ``nn.Parameter``s (``gate_up_proj`` (E, H, 2I), ``down_proj`` (E, I, H)), not
  ``nn.Linear``, so bitsandbytes' 4-bit loading leaves them in bf16: ~96.6B of Scout's ~109B parameters,
  3.75 GiB per decoder layer (bitsandbytes issue #1849). :class:`Llama4NF4Experts` stores them packed NF4 with
  bitsandbytes' own ``quantize_4bit`` (0.94 GiB per layer) and dequantizes all experts of a projection in one call,
  just in time (a Triton kernel on CUDA, bit-identical to bitsandbytes' and ~1.5x faster), then runs
  ``torch._grouped_mm``; with gradient checkpointing the routed experts are skipped in the recompute
  (docs/bench-h200.md: 1,942 → 3,165 tokens/s for the 48-layer Scout-shaped model at 4,096 tokens on one H200).
- :func:`load_llama4_qlora` loads a checkpoint in the Scout layout with the walkthrough's ``BitsAndBytesConfig``
  for every ``nn.Linear`` while the routed experts never exist in bf16 on the GPU as a whole: transformers loads
  everything else; the expert tensors are then read one at a time from the safetensors shards and quantized.

Routing math (transformers 5.23 ``modeling_llama4.py``, ``Llama4Router`` and ``Llama4TextMoe``): router logits
``x @ W_r^T`` (T, E); top-k logits per token; score = sigmoid(top-k logit) (computed in fp32, cast back); the
expert's *input* is scaled by the score, ``expert_e(x * s_e)``; outputs summed over the selected experts and added
to the shared expert's output. The MoE returns ``(out (T, H), router_logits (T, E))``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from transformers import Llama4TextConfig
from transformers.activations import ACT2FN
from transformers.models.llama4.modeling_llama4 import Llama4TextExperts, Llama4TextMoe

from medtune.families import ROUTED_EXPERT_PARAMETERS  # re-exported: the routed-expert LoRA targets
from medtune.llama4 import expert_lora, kernels
from medtune.llama4.dispatch import assemble as _assemble
from medtune.llama4.dispatch import check_counts as _check_counts
from medtune.llama4.dispatch import grouped_mm_ok as _grouped_mm_ok
from medtune.llama4.dispatch import host_counts as _host_counts
from medtune.llama4.dispatch import nf4_code as _nf4_code
from medtune.llama4.dispatch import offsets as _offsets

logger = logging.getLogger(__name__)

GIB = 2**30
NF4_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block; the same as BitsAndBytesConfig's
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for double-quantized absmax (functional.quantize_4bit)
EXPERTS_FILE = "experts-nf4.safetensors"

# Llama 4 Scout (meta-llama/Llama-4-Scout-17B-16E-Instruct) text model, as in FIELD-NOTES.md.
SCOUT_TEXT_DIMS = dict(
    vocab_size=202048,
    hidden_size=5120,
    intermediate_size=8192,
    intermediate_size_mlp=16384,
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    num_local_experts=16,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
)

__all__ = [
    "Llama4NF4Experts",
    "Llama4SparseExperts",
    "Llama4SparseMoe",
    "check_lora_config",
    "check_packing",
    "is_llama4",
    "load_llama4_qlora",
    "prepare_llama4_for_qlora",
    "prepare_moe",
    "save_quantized",
    "scout_text_config",
    "weights_gib",
]


def scout_text_config(**overrides) -> Llama4TextConfig:
    """Llama 4 Scout's text config (dimensions in ``SCOUT_TEXT_DIMS``), with ``overrides`` applied.

    Used by the benchmark (Scout-shaped random models) and by tests (tiny models: pass small dims).
    """
    return Llama4TextConfig(**{**SCOUT_TEXT_DIMS, **overrides})


def _unwrap(model):
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def is_llama4(model_or_config) -> bool:
    """True for a Llama 4 model (bare or PEFT-wrapped) or config (``model_type`` llama4 or llama4_text).

    The decision is :func:`medtune.families.is_llama4` (the one place that makes it); see there for the inputs
    taken (also a config dict or a ``model_type`` string) and the errors raised.
    """
    from medtune import families

    return families.is_llama4(model_or_config)


# --------------------------------------------------------------------------------------------------------------
# Sparse dispatch
# --------------------------------------------------------------------------------------------------------------


class Llama4SparseExperts(Llama4TextExperts):
    """transformers' ``Llama4TextExperts`` (same parameters, same state_dict) that also runs sparsely.

    ``forward(x)`` is transformers' dense forward. ``forward(x, counts)`` takes the routed tokens sorted by expert,
    x (N, H), and ``counts`` (E ints, sum N; a Python sequence or an (E,) integer tensor, e.g. on the GPU): rows
    ``[sum(counts[:e]), sum(counts[:e+1]))`` go through expert e only. Returns (N, H) in x's dtype. Experts with 0
    tokens are skipped. On CUDA with bf16 (sm90+) it uses ``torch._grouped_mm`` (one kernel per projection; a
    tensor ``counts`` then costs no host sync), elsewhere a per-expert loop. Plain autograd: gradients reach the
    weights too, so PEFT ``target_parameters`` LoRA on ``gate_up_proj`` / ``down_proj`` works.

    Raises:
        ValueError: ``len(counts) != num_experts``, or (sequence ``counts``) ``sum(counts) != x.shape[0]``.
    """

    use_grouped_mm = True

    def forward(self, hidden_states: torch.Tensor, counts: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        if counts is None:
            return super().forward(hidden_states)
        _check_counts(hidden_states, counts, self.num_experts)
        gate_up, down = self.gate_up_proj, self.down_proj  # read once: PEFT parametrizations return W + dW
        if self.use_grouped_mm and _grouped_mm_ok(hidden_states) and gate_up.dtype == torch.bfloat16:
            offs = _offsets(counts, hidden_states.device)
            gu = torch._grouped_mm(hidden_states, gate_up, offs=offs)
            g, u = gu.chunk(2, dim=-1)
            return torch._grouped_mm(self.act_fn(g) * u, down, offs=offs)
        outs, start = [], 0
        for e, n in enumerate(_host_counts(counts)):
            if n:
                g, u = (hidden_states[start : start + n] @ gate_up[e]).chunk(2, dim=-1)
                outs.append((self.act_fn(g) * u) @ down[e])
                start += n
        return torch.cat(outs) if outs else hidden_states.new_zeros(0, self.hidden_size)


def _in_checkpoint_recompute() -> bool:
    """True while ``torch.utils.checkpoint`` (non-reentrant) re-runs a forward to rebuild saved tensors.

    Read from the innermost saved-tensor hooks, which that recompute pushes (``_recomputation_hook``, torch 2.x);
    False when unknown (other torch internals, reentrant checkpoint, other hooks on top), which is always safe.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        hooks = top(False) if top is not None else None
    except Exception:  # noqa: BLE001 - a torch internal; any failure means "don't know"
        return False
    return hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_recomputation_hook.")


def _note_layer_checkpointing(layer: nn.Module, args) -> None:
    """Forward pre-hook on a decoder layer: tell its :class:`Llama4SparseMoe` whether this call is checkpointed
    layer by layer (transformers ``GradientCheckpointingLayer``: ``gradient_checkpointing`` and training)."""
    moe = getattr(layer, "feed_forward", None)
    if isinstance(moe, Llama4SparseMoe):
        moe._layer_checkpointed = bool(getattr(layer, "gradient_checkpointing", False) and layer.training)


class Llama4SparseMoe(Llama4TextMoe):
    """transformers' ``Llama4TextMoe`` (same submodules, same state_dict) with top-k sparse dispatch.

    forward(hidden_states (..., H)) -> (out (T, H), router_logits (T, E)), T = tokens, exactly the contract of
    ``Llama4TextMoe.forward``. The router module is called as in transformers, so ``output_router_logits``
    capture keeps working. Tokens are sorted by expert and the experts module is called as ``experts(x, counts)``
    with ``counts`` an (E,) int64 tensor on x's device (see :class:`Llama4SparseExperts` /
    :class:`Llama4NF4Experts`); a PEFT ``ParamWrapper`` around it passes the extra argument through. No host
    sync on the GPU path (``torch.bincount`` would sync, hence ``scatter_add_``). Equal to the dense forward up
    to floating-point summation order (top_k > 1). NF4 experts under PEFT ``target_parameters`` wrappers (LoRA on
    the routed experts) are not called through the wrappers: :func:`medtune.llama4.expert_lora.routed_forward` adds
    the active adapters' per-expert low-rank terms without forming a dense weight.

    Gradient checkpointing: with NF4 experts, when transformers checkpoints the enclosing decoder layer on its
    own (``gradient_checkpointing_enable``, non-reentrant) and ``skip_recompute`` is True, the recompute that
    precedes the layer's backward does not run the routed experts: their output only feeds
    ``index_add`` and the residual add, which save nothing of it, and their backward
    (:class:`_NF4ExpertsFunction`) needs only their input, which is still saved. Saves one NF4 dequantization
    and the expert forward matmuls per layer and step; gradients are unchanged (tests/llama4/test_llama4.py; with
    LoRA on the NF4 experts: tests/llama4/test_expert_lora.py).
    The decoder-layer flag is set by a forward pre-hook that :func:`prepare_llama4_for_qlora` registers;
    without it (MoE used on its own) the recompute runs in full.
    """

    skip_recompute = True
    _layer_checkpointed = False

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        router_scores, router_logits = self.router(x)  # (T, E) sigmoid scores, 0 where not selected; (T, E)
        top_idx = torch.topk(router_logits, self.top_k, dim=1).indices  # (T, k), as Llama4Router selects
        top_scores = router_scores.gather(1, top_idx)  # (T, k): gradient reaches the router like the dense path
        flat = top_idx.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // self.top_k  # (T*k,) source token of each sorted row
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))  # (E,) tokens per expert, stays on the device
        routed_in = x[token] * top_scores.reshape(-1, 1)[order]  # expert input scaled by its score
        nf4 = expert_lora.nf4_under(self.experts)  # NF4 experts, bare or under PEFT target_parameters wrappers
        if nf4 is not None:
            skip = self.skip_recompute and self._layer_checkpointed and _in_checkpoint_recompute()
            routed_out = expert_lora.routed_forward(self.experts, nf4, routed_in, counts, output_needed=not skip)
        else:
            routed_out = self.experts(routed_in, counts)
        out = self.shared_expert(x)
        return out.index_add(0, token, routed_out.to(out.dtype)), router_logits


# --------------------------------------------------------------------------------------------------------------
# NF4 routed experts
# --------------------------------------------------------------------------------------------------------------

class _NF4ExpertsFunction(torch.autograd.Function):
    """Routed experts on NF4 weights, forward and backward w.r.t. the input; the weights are frozen.

    apply(x (N, H) compute dtype, experts, counts (E,) int tensor or E ints, compute: bool) -> (N, H).
    Saves only the (sorted, score-scaled) input x. Forward: dequantize all experts' gate_up (one dequantize call
    per group of experts, :meth:`Llama4NF4Experts._groups`), project, free it; then down likewise. Backward dequantizes
    again (down first, then gate_up, so at most one projection of one group is alive) and recomputes the gate/up
    projection: no dequantized weight and no (N, 2I) activation outlives the call. ``compute=False`` (checkpoint
    recompute, see :class:`Llama4SparseMoe`) saves x and returns zeros without touching the weights.
    With ``Llama4NF4Experts.fused_gemm`` "auto" (CUDA; opt-in for now) every product instead reads the packed bytes
    inside a grouped GEMM (:meth:`Llama4NF4Experts.gemm`): no dequantized copy at all, no host sync; same roundings.
    Gradient formulas: y = (act(g) * u) @ W2, [g|u] = x @ W1 ->
    da = dy @ W2^T; dg = act'(g) * u * da; du = act(g) * da; dx = [dg|du] @ W1^T.
    """

    @staticmethod
    def forward(ctx, x, experts, counts, compute):
        ctx.save_for_backward(x)
        ctx.experts, ctx.counts = experts, counts
        if not compute:
            return x.new_zeros(x.shape[0], experts.hidden_size)
        if experts._use_gemm(x):
            h = experts._gated_gemm(x, counts)
            y = None if h is None else experts.gemm("down", h, counts)
            if y is not None:
                return y
        parts = []
        for rows, group, mm in experts._groups(x, counts):
            g, u = mm(x[rows], experts.dequantize_experts("gate_up", *group)).chunk(2, dim=-1)
            h = experts.act_fn(g) * u
            del g, u
            parts.append((rows, mm(h, experts.dequantize_experts("down", *group))))
        return _assemble(parts, lambda: x.new_zeros(x.shape[0], experts.hidden_size))

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        experts = ctx.experts
        dy = grad_out.to(x.dtype).contiguous()
        if experts._use_gemm(x):
            dx = _NF4ExpertsFunction._backward_gemm(x, dy, experts, ctx.counts)
            if dx is not None:
                return dx, None, None, None
        parts = []
        for rows, group, mm in experts._groups(x, ctx.counts):
            da = mm(dy[rows], experts.dequantize_experts("down", *group).transpose(-2, -1))
            w1 = experts.dequantize_experts("gate_up", *group)
            g, u = mm(x[rows], w1).chunk(2, dim=-1)
            dgu = _gated_grad(experts.act_fn, g, u, da)
            del g, u, da
            parts.append((rows, mm(dgu, w1.transpose(-2, -1))))
            del w1, dgu
        return _assemble(parts, lambda: torch.zeros_like(x)), None, None, None

    @staticmethod
    def _backward_gemm(x, dy, experts, counts):
        """dx from the packed weights (:meth:`Llama4NF4Experts.gemm`): no dequantized copy; None to fall back."""
        da = experts.gemm("down", dy, counts, transpose=True)
        gu = None if da is None else experts.gemm("gate_up", x, counts)
        if gu is None:
            return None
        g, u = gu.chunk(2, dim=-1)
        dgu = _gated_grad(experts.act_fn, g, u, da)
        del gu, g, u, da
        return experts.gemm("gate_up", dgu, counts, transpose=True)


def _gated_grad(act_fn, g: torch.Tensor, u: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    """[dg | du] of ``a = act(g) * u`` given ``da``: dg = act'(g) * u * da, du = act(g) * da; (n, 2I)."""
    with torch.enable_grad():
        g = g.detach().requires_grad_(True)
        a = act_fn(g)
        (dg,) = torch.autograd.grad(a, g, da * u)
    return torch.cat([dg, da * a.detach()], dim=-1)


def _loop_mm(counts: Sequence[int]):
    """(rows sorted by expert (n, K), weights (G, K, M)) -> (n, M): expert i of the group takes counts[i] rows."""

    def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for i, n in enumerate(counts):
            if n:
                outs.append(a[start : start + n] @ w[i])
                start += n
        return torch.cat(outs) if outs else a.new_zeros(0, w.shape[-1])

    return mm


class Llama4NF4Experts(nn.Module):
    """Llama 4 routed experts stored as packed NF4, one bitsandbytes 4-bit tensor per expert and projection.

    Replaces ``Llama4TextExperts`` (``gate_up_proj`` (E, H, 2I), ``down_proj`` (E, I, H)). Each expert's matrix is
    quantized with ``bitsandbytes.functional.quantize_4bit(W_e, blocksize=64, quant_type="nf4",
    compress_statistics=double_quant)``. Since every expert matrix is a whole number of 64-weight blocks, the
    packed data and absmax of consecutive experts are one valid NF4 tensor, so ``forward`` dequantizes
    ``dequant_group`` experts (default: all) with ONE ``dequantize_4bit`` call per projection, just in time, and
    frees the result right after use; the backward re-dequantizes (:class:`_NF4ExpertsFunction`). On CUDA with bf16
    (sm90+) the experts' matmuls are ``torch._grouped_mm`` over the sorted tokens (no host sync when ``counts`` is a
    device tensor and ``dequant_group`` covers all experts); elsewhere (CPU, fp32) a per-expert loop.
    Transient memory: one projection of ``dequant_group`` experts in ``compute_dtype`` (Scout, all 16: gate_up
    2.5 GiB, down 1.25 GiB, never both at once) plus the (N, 2I) activations. With N < 2 E (token-by-token
    generation) only the experts that have tokens are dequantized, one at a time. On CUDA in bf16/fp16 the
    dequantization is a Triton kernel bit-identical to bitsandbytes' (``triton_dequant``; env
    ``MEDTUNE_NF4_TRITON=0`` turns it off).
    The weights are frozen. LoRA goes on top through PEFT ``target_parameters`` (``gate_up_proj``, ``down_proj``):
    for PEFT the module lists shape-only placeholders under those names (:meth:`named_parameters` with
    ``recurse=False``, attribute access), and :class:`Llama4SparseMoe` computes the per-expert low-rank terms
    (:mod:`medtune.llama4.expert_lora`). Works on CPU and CUDA (bitsandbytes 0.50.2).

    Buffers per projection ``p`` in {gate_up, down} (n = elements per expert matrix, b = n / 64):
    ``p_packed`` uint8 (E, n/2); ``p_absmax`` float32 (E, b), or with double quant uint8 (E, b) plus
    ``p_absmax2`` float32 (E, ceil(b/256)) and ``p_offset`` float32 (E,); with double quant also ``dq_code``
    float32 (256,), bitsandbytes' 8-bit dynamic map. Size: ~0.5 byte per weight + 4 bytes per 64 weights
    (0.56 bytes/weight; 0.94 GiB per Scout layer vs 3.75 GiB bf16).

    forward(x (N, H), counts (E ints, or an (E,) integer tensor) | None, output_needed=True) -> (N, H) in x's
    dtype, computed in ``compute_dtype``. ``counts`` as in :class:`Llama4SparseExperts`; None means transformers'
    dense layout (N = E * T, every token through every expert). ``output_needed=False`` (used by
    :class:`Llama4SparseMoe` inside a gradient-checkpoint recompute) returns zeros but keeps what backward needs.
    """

    is_nf4_experts = True  # how medtune.llama4.expert_lora recognises this module without importing it
    dequant_group: int | None = None  # experts per dequantize call; None = all (fewest calls, most memory)
    triton_dequant: bool = os.environ.get("MEDTUNE_NF4_TRITON", "1") != "0"  # CUDA: Triton kernel, else bitsandbytes
    # inference (no gradient): "auto": on CUDA up to ``fused_max_rows`` rows multiply straight from the packed bytes
    # (fused kernel, only the experts that have rows), above that dequantize all experts + grouped GEMM without a
    # host sync (:meth:`grouped_forward`); both can be captured in a CUDA graph. "always": the fused kernel on any
    # device and size (on the CPU through Triton's interpreter: tests). "off": the training path (per-expert
    # dequantize for few rows, reading the counts on the host), as before the decode work. Env MEDTUNE_NF4_FUSED
    # and MEDTUNE_NF4_FUSED_MAX_ROWS set the defaults; the crossover is measured by scripts/device/decode_gpu.py.
    fused: str = os.environ.get("MEDTUNE_NF4_FUSED", "auto")
    fused_max_rows: int = int(os.environ.get("MEDTUNE_NF4_FUSED_MAX_ROWS", "32"))
    # training (autograd through _NF4ExpertsFunction) and inference above ``fused_max_rows`` rows: "auto" multiplies
    # straight from the packed bytes on CUDA (:meth:`gemm`, no bf16 copy of the experts), "always" on any device
    # (tests), "off" dequantizes every expert and runs torch._grouped_mm as before. Env MEDTUNE_NF4_FUSED_GEMM.
    # Default "off" until the kernel's bf16 results and speed are checked on a GPU (scripts/device/train_h200.sh):
    # its numerics are tested in Triton's interpreter in fp32 only, and a wrong product would train silently wrong.
    fused_gemm: str = os.environ.get("MEDTUNE_NF4_FUSED_GEMM", "off")

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        *,
        double_quant: bool = False,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.expert_dim = intermediate_size
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.shapes = {"gate_up": (hidden_size, 2 * intermediate_size), "down": (intermediate_size, hidden_size)}
        for name, (k, n_out) in self.shapes.items():
            n = k * n_out
            if n % NF4_BLOCKSIZE:
                raise ValueError(f"{name}: {k}x{n_out} is not a multiple of the NF4 block ({NF4_BLOCKSIZE})")
            blocks = n // NF4_BLOCKSIZE
            self.register_buffer(f"{name}_packed", torch.empty(num_experts, n // 2, dtype=torch.uint8, device=device))
            absmax_dtype = torch.uint8 if double_quant else torch.float32
            self.register_buffer(f"{name}_absmax", torch.empty(num_experts, blocks, dtype=absmax_dtype, device=device))
            if double_quant:
                nested = math.ceil(blocks / NESTED_BLOCKSIZE)
                self.register_buffer(f"{name}_absmax2", torch.empty(num_experts, nested, device=device))
                self.register_buffer(f"{name}_offset", torch.empty(num_experts, device=device))
        if double_quant:
            self.register_buffer("dq_code", torch.empty(256, device=device))

    @classmethod
    def from_experts(
        cls, experts: Llama4TextExperts, *, double_quant: bool = False, compute_dtype: torch.dtype = torch.bfloat16
    ) -> Llama4NF4Experts:
        """Quantize a transformers ``Llama4TextExperts`` (on its own device) into a new module."""
        gate_up = experts.gate_up_proj
        num_experts, hidden, two_i = gate_up.shape
        act = next((k for k, v in ACT2FN.items() if type(v) is type(experts.act_fn)), "silu")
        module = cls(num_experts, hidden, two_i // 2, act, double_quant=double_quant, compute_dtype=compute_dtype,
                     device=gate_up.device)
        module.quantize_("gate_up", gate_up.detach())
        module.quantize_("down", experts.down_proj.detach())
        return module

    @torch.no_grad()
    def quantize_(self, name: str, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (E, K, N) float, any device, into projection ``name``'s buffers (on their device).

        Each expert is moved to the buffers' device and quantized there, one at a time, so the transient memory
        is one expert matrix.

        Raises:
            ValueError: ``name`` unknown or ``weight``'s shape is not (E, K, N) of this module.
        """
        import bitsandbytes.functional as bnbf

        expected = (self.num_experts, *self.shapes.get(name, (-1, -1)))
        if tuple(weight.shape) != expected:
            raise ValueError(f"{name}: expected a weight of shape {expected}, got {tuple(weight.shape)}")
        packed = getattr(self, f"{name}_packed")
        for e in range(self.num_experts):
            w = weight[e].to(packed.device)
            if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                w = w.float()
            q, state = bnbf.quantize_4bit(
                w, blocksize=NF4_BLOCKSIZE, compress_statistics=self.double_quant, quant_type="nf4"
            )
            packed[e].copy_(q.reshape(-1))
            getattr(self, f"{name}_absmax")[e].copy_(state.absmax.reshape(-1))
            if self.double_quant:
                getattr(self, f"{name}_absmax2")[e].copy_(state.state2.absmax.reshape(-1))
                getattr(self, f"{name}_offset")[e].copy_(state.offset)
                self.dq_code.copy_(state.state2.code)

    def _absmax(self, name: str, e0: int, e1: int) -> torch.Tensor:
        """float32 absmax of experts [e0, e1) of projection ``name``, flat (G * b,), as bitsandbytes computes it
        for each expert's own QuantState (double quant: ``dequantize_blockwise(absmax, state2) + offset``)."""
        absmax = getattr(self, f"{name}_absmax")[e0:e1]
        if not self.double_quant:
            return absmax.reshape(-1)
        import bitsandbytes.functional as bnbf

        absmax2 = getattr(self, f"{name}_absmax2")[e0:e1]
        offset = getattr(self, f"{name}_offset")[e0:e1]

        def nested(a, a2):
            state2 = bnbf.QuantState(absmax=a2.reshape(-1), code=self.dq_code, blocksize=NESTED_BLOCKSIZE,
                                     dtype=torch.float32)
            return bnbf.dequantize_blockwise(a.reshape(-1), quant_state=state2)

        blocks = absmax.shape[1]
        if blocks % NESTED_BLOCKSIZE == 0:  # nested blocks never straddle two experts: one call for the group
            full = nested(absmax, absmax2).view(e1 - e0, blocks)
        else:
            full = torch.stack([nested(absmax[i], absmax2[i]) for i in range(e1 - e0)])
        return (full + offset[:, None]).reshape(-1)

    def dequantize_experts(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Experts [start, stop) (default all) of projection ``name`` in ``compute_dtype``, from ONE bitsandbytes
        ``dequantize_4bit`` call (on CUDA in bf16/fp16 with ``triton_dequant``: one call of the equivalent Triton
        kernel, :func:`medtune.llama4.kernels.nf4_dequantize`): (G, H, 2I) for gate_up, (G, I, H) for down,
        G = stop - start.
        Bit-identical to dequantizing each expert with its own QuantState (tests/llama4/test_llama4.py; Triton: on the
        GPU with scripts/device/check_triton_dequant.py, and on the CPU in tests/llama4/test_decode.py)."""
        import bitsandbytes.functional as bnbf

        stop = self.num_experts if stop is None else stop
        packed = getattr(self, f"{name}_packed")[start:stop]
        shape = (stop - start, *self.shapes[name])
        if self.triton_dequant and packed.is_cuda and self.compute_dtype in (torch.bfloat16, torch.float16):
            out = kernels.nf4_dequantize(packed.reshape(-1), self._absmax(name, start, stop).contiguous(),
                                         _nf4_code(packed.device), shape, self.compute_dtype)
            if out is not None:
                return out
        state = bnbf.QuantState(
            absmax=self._absmax(name, start, stop), shape=torch.Size((stop - start, *self.shapes[name])),
            code=_nf4_code(packed.device), blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=self.compute_dtype,
        )
        return bnbf.dequantize_4bit(packed.reshape(-1, 1), quant_state=state)

    def dequantize(self, name: str, e: int) -> torch.Tensor:
        """Expert ``e``'s ``name`` matrix, (H, 2I) for gate_up or (I, H) for down, in ``compute_dtype``."""
        return self.dequantize_experts(name, e, e + 1)[0]

    def dequantized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts dequantized: (gate_up (E, H, 2I), down (E, I, H)) in ``compute_dtype``. For tests/export."""
        return self.dequantize_experts("gate_up"), self.dequantize_experts("down")

    def _groups(self, x: torch.Tensor, counts: Sequence[int] | torch.Tensor):
        """Yield (rows, (e0, e1), mm) per group of ``dequant_group`` experts that has tokens: ``x[rows]`` are the
        group's rows; ``mm(a (n, K), w (G, K, M)) -> (n, M)`` multiplies each expert's rows by its matrix
        (``torch._grouped_mm`` on CUDA bf16 sm90+, else a loop). One group of all experts on the grouped path
        needs no host copy of ``counts``; anything else reads them once (one sync for a device tensor). With
        fewer than 2 rows per expert (generation) groups are single experts, so idle experts are not dequantized."""
        num = self.num_experts
        size = min(self.dequant_group or num, num)
        if x.shape[0] < 2 * num:  # few tokens (decoding): dequantize only the experts that have tokens
            size = 1
        grouped = _grouped_mm_ok(x)
        if grouped and size >= num:
            offs = _offsets(counts, x.device)
            yield slice(None), (0, num), lambda a, w: torch._grouped_mm(a, w, offs=offs)
            return
        host = _host_counts(counts)
        ends = torch.tensor(host).cumsum(0).tolist()
        starts = [0, *ends[:-1]]
        offs = _offsets(counts, x.device) if grouped else None
        for e0 in range(0, num, size):
            e1 = min(num, e0 + size)
            r0, r1 = starts[e0], ends[e1 - 1]
            if r1 == r0:
                continue
            if grouped:
                local = offs[e0:e1] - r0
                mm = lambda a, w, local=local: torch._grouped_mm(a, w, offs=local)  # noqa: E731
            else:
                mm = _loop_mm(host[e0:e1])
            yield slice(r0, r1), (e0, e1), mm

    def forward(
        self,
        hidden_states: torch.Tensor,
        counts: Sequence[int] | torch.Tensor | None = None,
        output_needed: bool = True,
    ) -> torch.Tensor:
        if counts is None:  # transformers' dense layout: (E * T, H), T tokens per expert
            counts = [hidden_states.shape[0] // self.num_experts] * self.num_experts
        _check_counts(hidden_states, counts, self.num_experts)
        x = hidden_states.to(self.compute_dtype).contiguous()
        if self._use_fused(x):
            counts_t = counts if isinstance(counts, torch.Tensor) else torch.tensor(list(counts), device=x.device)
            out = self.fused_forward(x, counts_t)
            if out is not None:
                return out.to(hidden_states.dtype)
        if self._inference_grouped(x, counts):
            return self.grouped_forward(x, counts).to(hidden_states.dtype)
        if not isinstance(counts, torch.Tensor):
            counts = tuple(int(c) for c in counts)
        return _NF4ExpertsFunction.apply(x, self, counts, bool(output_needed)).to(hidden_states.dtype)

    def _use_fused(self, x: torch.Tensor) -> bool:
        """The fused kernel serves inference (no gradient wanted) on few rows: see ``fused``."""
        if self.fused == "off" or (torch.is_grad_enabled() and x.requires_grad):
            return False
        if self.fused == "auto" and not (x.is_cuda and x.shape[0] <= self.fused_max_rows):
            return False
        return self.hidden_act == "silu" and kernels.available()

    def _inference_grouped(self, x: torch.Tensor, counts) -> bool:
        """Inference on CUDA bf16 (sm90+) with device counts: :meth:`grouped_forward` (no host sync)."""
        return (self.fused != "off" and isinstance(counts, torch.Tensor) and _grouped_mm_ok(x)
                and not (torch.is_grad_enabled() and x.requires_grad))

    def grouped_forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Inference without a host sync: with ``fused_gemm`` both projections through :meth:`gemm` (no
        dequantized copy), else every expert of a projection dequantized in one call and ``torch._grouped_mm`` over
        the rows sorted by expert (offsets from the device ``counts``); either can be captured in a CUDA graph.
        x (N, H) in ``compute_dtype`` -> (N, H). Training goes through :class:`_NF4ExpertsFunction` instead."""
        if self._use_gemm(x):  # from the packed bytes, no dequantized copy
            h = self._gated_gemm(x, counts)
            out = None if h is None else self.gemm("down", h, counts)
            if out is not None:
                return out
        offs = _offsets(counts, x.device)
        g, u = torch._grouped_mm(x, self.dequantize_experts("gate_up"), offs=offs).chunk(2, dim=-1)
        h = self.act_fn(g) * u
        del g, u
        return torch._grouped_mm(h, self.dequantize_experts("down"), offs=offs)

    def fused_forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """Both projections straight from the packed NF4 bytes (:func:`medtune.llama4.kernels.nf4_moe_matmul`):
        x (N, H) in ``compute_dtype`` sorted by expert, counts (E,) integer tensor on x's device -> (N, H), or None
        when the kernel does not apply (no Triton, a shape that does not tile) or failed to build or launch in this
        process (:func:`medtune.llama4.kernels.guarded`: the caller then takes the dequantize path). Reads only the
        experts with rows; no host sync. No autograd: inference only."""
        code = _nf4_code(x.device)
        num = self.num_experts
        h = kernels.guarded("nf4_moe_matmul", kernels.nf4_moe_matmul, x, counts, self.gate_up_packed,
                            self._absmax("gate_up", 0, num).view(num, -1), code, k=self.hidden_size,
                            n_out=self.intermediate_size, gated=True)
        if h is None:
            return None
        return kernels.guarded("nf4_moe_matmul", kernels.nf4_moe_matmul, h, counts, self.down_packed,
                               self._absmax("down", 0, num).view(num, -1), code, k=self.intermediate_size,
                               n_out=self.hidden_size, gated=False)

    def _use_gemm(self, x: torch.Tensor) -> bool:
        """Training (and any :class:`_NF4ExpertsFunction` call) multiplies straight from the packed bytes on the
        matrix units (:meth:`gemm`) when ``fused_gemm`` allows it: "auto" on CUDA in bf16/fp16, "always" on any
        device (the CPU tests, through Triton's interpreter), "off" never."""
        if self.fused_gemm == "off" or not kernels.available() or self.hidden_act != "silu":
            return False
        return self.fused_gemm == "always" or (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16))

    def gemm(self, name: str, a: torch.Tensor, counts, transpose: bool = False) -> torch.Tensor | None:
        """``a_e @ W_e`` (or ``a_e @ W_e^T``) for the rows of each expert, W = projection ``name``, straight from
        the packed NF4 bytes (:func:`medtune.llama4.kernels.nf4_moe_gemm`): a (N, K) sorted by expert in
        ``compute_dtype``, counts (E,) tensor or E ints -> (N, M); None when the kernel does not apply or failed in
        this process (:func:`medtune.llama4.kernels.guarded`), and the caller dequantizes instead.

        Raises:
            ValueError: ``name`` is not a projection of this module, or the kernel's own input checks fail."""
        if name not in self.shapes:
            raise ValueError(f"unknown projection {name!r}; one of {sorted(self.shapes)}")
        k, n = self.shapes[name]
        num = self.num_experts
        if not isinstance(counts, torch.Tensor):
            counts = torch.tensor(list(counts), device=a.device)
        return kernels.guarded("nf4_moe_gemm", kernels.nf4_moe_gemm, a.contiguous(), counts.to(a.device),
                               getattr(self, f"{name}_packed"), self._absmax(name, 0, num).view(num, -1).contiguous(),
                               _nf4_code(a.device), w_rows=k, w_cols=n, transpose=transpose)

    def _gated_gemm(self, x: torch.Tensor, counts) -> torch.Tensor | None:
        """act(x W_gate) * (x W_up) through :meth:`gemm`, (N, I); None to fall back."""
        gu = self.gemm("gate_up", x, counts)
        if gu is None:
            return None
        g, u = gu.chunk(2, dim=-1)
        return self.act_fn(g) * u

    @property
    def gate_up_proj(self) -> nn.Parameter:
        """Shape-only (E, H, 2I) placeholder for PEFT ``target_parameters`` (:func:`expert_lora.placeholder`)."""
        return expert_lora.placeholder(self, "gate_up")

    @property
    def down_proj(self) -> nn.Parameter:
        """Shape-only (E, I, H) placeholder for PEFT ``target_parameters`` (:func:`expert_lora.placeholder`)."""
        return expert_lora.placeholder(self, "down")

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """``nn.Module``'s (none), plus the ``gate_up_proj`` and ``down_proj`` placeholders, when asked of this
        module itself (how PEFT looks for ``target_parameters`` and where it places the adapters). A walk over an
        enclosing model reads each module's ``_parameters`` and never lists them (optimizer, state_dict, ``.to()``,
        parameter counts); :func:`weights_gib` skips them."""
        yield from super().named_parameters(prefix, recurse, remove_duplicate)
        yield from expert_lora.placeholders(self, prefix)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, nf4, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------


def _moe_modules(model) -> list[tuple[str, Llama4TextMoe]]:
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, Llama4TextMoe)]


def prepare_llama4_for_qlora(
    model,
    *,
    sparse_moe: bool = True,
    quantize_experts: bool = True,
    double_quant: bool = False,
    compute_dtype: torch.dtype = torch.bfloat16,
):
    """Make a Llama 4 model fit one GPU and train fast, in place; returns ``model``.

    Args:
        model: a Llama 4 model (``Llama4ForConditionalGeneration``, ``Llama4ForCausalLM``, ``Llama4TextModel``),
            its ``nn.Linear`` layers possibly already bitsandbytes 4-bit (the walkthrough's load). Call before PEFT.
        sparse_moe: every ``Llama4TextMoe`` becomes :class:`Llama4SparseMoe` (top-k dispatch; same parameters).
        quantize_experts: every routed-expert block becomes :class:`Llama4NF4Experts`, quantized on the device
            where its weights are; the bf16 weights are freed. Otherwise, with ``sparse_moe``, experts become
            :class:`Llama4SparseExperts` (same parameters).
        double_quant: quantize the NF4 absmax statistics too (bitsandbytes ``compress_statistics``):
            ~0.4 bits/weight less.
        compute_dtype: dtype the NF4 experts are dequantized to and computed in.

    Decoder layers whose MoE is sparse get a forward pre-hook that lets the MoE skip its NF4 routed experts in
    the gradient-checkpoint recompute (:class:`Llama4SparseMoe`); calling this again on a prepared model only
    adds what is missing. With both flags False the model is left exactly as transformers built it. A model that
    is not Llama 4 is returned unchanged, with a log line saying so.
    """
    if not is_llama4(model):
        logger.info("prepare_llama4_for_qlora: %s is not Llama 4; left unchanged", type(_unwrap(model)).__name__)
        return model
    for _, moe in _moe_modules(model):
        prepare_moe(moe, sparse_moe=sparse_moe, quantize_experts=quantize_experts, double_quant=double_quant,
                    compute_dtype=compute_dtype)
    for layer in _unwrap(model).modules():
        if isinstance(getattr(layer, "feed_forward", None), Llama4SparseMoe) and not getattr(
            layer, "_medtune_checkpoint_hook", False
        ):
            layer.register_forward_pre_hook(_note_layer_checkpointing)  # see Llama4SparseMoe: skip_recompute
            layer._medtune_checkpoint_hook = True
    return model


def prepare_moe(
    moe: Llama4TextMoe,
    *,
    sparse_moe: bool = True,
    quantize_experts: bool = True,
    double_quant: bool = False,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Llama4TextMoe:
    """:func:`prepare_llama4_for_qlora` for one ``Llama4TextMoe`` (e.g. a decoder layer built on its own)."""
    if sparse_moe and not isinstance(moe, Llama4SparseMoe):
        moe.__class__ = Llama4SparseMoe
    experts = moe.experts
    if quantize_experts and isinstance(experts, Llama4TextExperts):
        moe.experts = Llama4NF4Experts.from_experts(experts, double_quant=double_quant, compute_dtype=compute_dtype)
    elif sparse_moe and type(experts) is Llama4TextExperts:
        experts.__class__ = Llama4SparseExperts
    return moe


def check_lora_config(model, lora_config) -> None:
    """Refuse LoRA settings that cannot work on this model's routed experts, with the reason.

    LoRA on the routed experts uses PEFT ``target_parameters`` (``ROUTED_EXPERT_PARAMETERS``), which wraps the
    3-D ``nn.Parameter``s in a ``ParamWrapper``: on bf16 experts it adds the low-rank delta to the weight through a
    parametrization; on NF4 experts :class:`Llama4SparseMoe` adds the per-expert low-rank terms itself
    (:mod:`medtune.llama4.expert_lora`).

    Raises:
        ValueError: routed experts targeted with ``lora_dropout`` > 0 (PEFT's ParamWrapper cannot apply dropout:
            the input cannot be factored out of the delta weight), or NF4 experts targeted under transformers' dense
            ``Llama4TextMoe`` (``sparse_moe=False``: PEFT would form the dense (E, H, 2I) weight, which NF4 does not
            hold; prepare with ``sparse_moe=True``).
    """
    targets = list(getattr(lora_config, "target_parameters", None) or [])
    routed = [t for t in targets
              if any(t.endswith(p.split(".")[-1]) and "experts" in t for p in ROUTED_EXPERT_PARAMETERS)]
    if not routed:
        return
    if getattr(lora_config, "lora_dropout", 0.0):
        raise ValueError(
            f"LoRA on the routed experts (target_parameters={routed}) needs lora_dropout=0 "
            f"(got lora_dropout={lora_config.lora_dropout}): PEFT applies it as a weight delta, with no input to drop."
        )
    dense = [n for n, m in _moe_modules(model)
             if expert_lora.nf4_under(m.experts) is not None and not isinstance(m, Llama4SparseMoe)]
    if dense:
        raise ValueError(
            f"LoRA on the routed experts (target_parameters={routed}) with NF4 experts needs the sparse MoE "
            f"(Llama4SparseMoe), which adds the low-rank terms per expert; {dense[0]} is transformers' dense "
            "Llama4TextMoe, where PEFT would build the dense expert weight that NF4 does not hold. Prepare the model "
            "with sparse_moe=True (the default)."
        )


def check_packing(config, max_length: int | None) -> None:
    """Refuse packed sequences (TRL ``packing`` / ``padding_free``) that Llama 4 would not keep apart, with the fix.

    Packing is exact otherwise (tests/llama4/test_packing.py): transformers builds the causal and chunked masks per
    row from the restarting ``position_ids`` (``masking_utils.find_packed_sequence_indices``) and RoPE reads them.
    The exception is the NoPE layers' attention temperature tuning (Llama4TextAttention, transformers 5.23): it
    scales queries by ``log1p(floor((p + 1) / floor_scale)) * attn_scale + 1`` with ``p`` counted over the whole
    packed sequence, not the row. The scale is 1 while ``p + 1 < floor_scale``, so packs of at most
    ``floor_scale - 1`` tokens (Scout: 8,191) are exact and longer ones are not.

    Args:
        config: a Llama 4 config (``Llama4Config`` or its ``text_config``); other models pass.
        max_length: tokens per packed sequence (``sft.max_length``); None means no limit.

    Raises:
        ValueError: temperature tuning is on and ``max_length`` is None or above ``floor_scale - 1``.
    """
    text = getattr(config, "text_config", None) or config
    if not is_llama4(text) or not getattr(text, "attn_temperature_tuning", False):
        return
    limit = int(text.floor_scale) - 1
    if max_length is None or max_length > limit:
        shown = "no limit" if max_length is None else max_length
        raise ValueError(
            f"packing: sft.max_length {shown} is too long for this Llama 4 model: its NoPE layers scale attention by "
            f"the position in the whole packed sequence once it reaches floor_scale {text.floor_scale} "
            f"(config.json), which would mix rows. Set sft.max_length to at most {limit}, or packing: false."
        )


def weights_gib(module: nn.Module) -> float:
    """Bytes of all parameters and buffers of ``module`` (bnb 4-bit weights counted packed; the NF4 experts'
    shape-only LoRA placeholders not at all), in GiB."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen and not expert_lora.is_placeholder(t):
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total / GIB


# --------------------------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------------------------

_EXPERT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


class _ExpertsPlaceholder(nn.Module):
    """Stands in for a layer's routed experts while transformers loads the rest: no parameters, so the expert
    tensors of the checkpoint are skipped (reported as unexpected keys) and nothing is allocated for them."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, *args, **kwargs):
        raise RuntimeError("routed experts not loaded yet (load_llama4_qlora streams them after from_pretrained)")


@contextmanager
def _experts_deferred():
    """While active, ``Llama4TextMoe`` builds a placeholder instead of its bf16 experts, and from_pretrained does not
    report the checkpoint's expert tensors as "UNEXPECTED" (they are streamed in afterwards by the caller)."""
    from transformers.models.llama4.modeling_llama4 import Llama4PreTrainedModel

    original = Llama4TextMoe.__init__
    ignore = Llama4PreTrainedModel._keys_to_ignore_on_load_unexpected

    def init(self, config):
        original(self, config)
        self.experts = _ExpertsPlaceholder(config)

    Llama4TextMoe.__init__ = init
    Llama4PreTrainedModel._keys_to_ignore_on_load_unexpected = [
        *(ignore or []), r"feed_forward\.experts\.(gate_up_proj|down_proj)$"]
    try:
        yield
    finally:
        Llama4TextMoe.__init__ = original
        Llama4PreTrainedModel._keys_to_ignore_on_load_unexpected = ignore


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != EXPERTS_FILE]
    if not files:
        raise FileNotFoundError(f"no safetensors checkpoint in {folder}")
    return files


def load_llama4_qlora(
    path_or_id: str | Path,
    bnb_config,
    *,
    device: str | torch.device = "cuda",
    sparse_moe: bool = True,
    quantize_experts: bool = True,
    double_quant: bool = False,
    torch_dtype: torch.dtype = torch.bfloat16,
    model_class=None,
    experts_file: str | Path | None = None,
):
    """Load a Llama 4 checkpoint for QLoRA on one device without holding its bf16 routed experts there.

    transformers loads every tensor except the routed experts, with ``bnb_config`` (the walkthrough's
    ``BitsAndBytesConfig``: its ``nn.Linear`` layers become bitsandbytes 4-bit) on ``device``. The routed
    experts are then read one tensor at a time (one layer's ``gate_up_proj`` (E, H, 2I) or ``down_proj``) from the
    safetensors shards and quantized to NF4 on ``device`` (:class:`Llama4NF4Experts`), or, with
    ``quantize_experts=False``, kept as bf16 parameters. Peak extra memory while streaming: one such tensor.
    If ``experts_file`` (default: ``<folder>/experts-nf4.safetensors`` when it exists and ``quantize_experts``)
    holds experts saved by :func:`save_quantized` with the same ``double_quant``, they are loaded from it and
    nothing is re-quantized.

    Args:
        path_or_id: a local folder or a Hub id in the Scout layout (``Llama4ForConditionalGeneration``
            ``save_pretrained``: keys ``language_model.model.layers.N.feed_forward.experts.gate_up_proj``), or a
            ``Llama4ForCausalLM`` folder (``model.layers.N...``).
        bnb_config: ``transformers.BitsAndBytesConfig`` (or None for no 4-bit Linears).
        device: where the model goes (``"cuda"``, ``"cuda:0"``, ``"cpu"``).
        model_class: default ``Llama4ForConditionalGeneration`` for ``model_type == "llama4"``,
            ``Llama4ForCausalLM`` for ``"llama4_text"``.

    Returns:
        The model (eval mode as from_pretrained leaves it), prepared as by :func:`prepare_llama4_for_qlora`.

    Raises:
        FileNotFoundError: no safetensors checkpoint in the folder.
        ValueError: the config is not Llama 4; an expert tensor is missing from the checkpoint; ``experts_file``
            was saved with another ``double_quant`` setting.
    """
    from huggingface_hub import snapshot_download
    from safetensors import safe_open
    from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration

    from medtune.compat import load_config

    folder = Path(path_or_id)
    if not folder.is_dir():
        folder = Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.model"]))
    config = load_config(folder)  # legacy config.json values cleaned (medtune.compat)
    if not is_llama4(config):
        raise ValueError(f"{path_or_id}: model_type {config.model_type!r} is not Llama 4")
    if model_class is None:
        model_class = Llama4ForConditionalGeneration if config.model_type == "llama4" else Llama4ForCausalLM
    device = torch.device(device)
    kwargs = dict(config=config, dtype=torch_dtype, device_map={"": device})
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
    with _experts_deferred():
        model = model_class.from_pretrained(folder, **kwargs)

    moes = {int(re.search(r"layers\.(\d+)\.", n).group(1)): m for n, m in _moe_modules(model)}
    text_config = model.config.get_text_config()
    if experts_file is None and quantize_experts and (folder / EXPERTS_FILE).is_file():
        experts_file = folder / EXPERTS_FILE
    for moe in moes.values():
        if quantize_experts:
            moe.experts = Llama4NF4Experts(
                text_config.num_local_experts, text_config.hidden_size, text_config.intermediate_size,
                text_config.hidden_act, double_quant=double_quant, compute_dtype=torch_dtype, device=device,
            )
        else:
            with torch.device(device):
                experts = Llama4TextExperts(text_config).to(torch_dtype)
            experts.requires_grad_(False)
            moe.experts = experts

    if experts_file is not None and quantize_experts:
        with safe_open(str(experts_file), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("double_quant") != str(double_quant):
                raise ValueError(f"{experts_file} was saved with double_quant={meta.get('double_quant')}, "
                                 f"asked for double_quant={double_quant}")
            for i, moe in moes.items():
                for name, buf in moe.experts.named_buffers():
                    buf.copy_(f.get_tensor(f"layers.{i}.{name}"))
    else:
        found = set()
        for file in _checkpoint_files(folder):
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    match = _EXPERT_KEY.search(key)
                    if not match or "vision" in key or int(match.group(1)) not in moes:
                        continue
                    i, proj = int(match.group(1)), match.group(2)
                    tensor = f.get_tensor(key)
                    experts = moes[i].experts
                    if quantize_experts:
                        experts.quantize_(proj.removesuffix("_proj"), tensor)
                    else:
                        with torch.no_grad():
                            getattr(experts, proj).copy_(tensor)
                    del tensor
                    found.add((i, proj))
        missing = {(i, p) for i in moes for p in ("gate_up_proj", "down_proj")} - found
        if missing:
            raise ValueError(f"routed-expert tensors missing from {folder}: {sorted(missing)[:4]}...")
    return prepare_llama4_for_qlora(model, sparse_moe=sparse_moe, quantize_experts=False,
                                    double_quant=double_quant, compute_dtype=torch_dtype)


def save_quantized(model, folder: str | Path) -> Path:
    """Write the model's NF4 routed experts to ``<folder>/experts-nf4.safetensors`` and return its path.

    Keys ``layers.{i}.{buffer}`` (buffers of :class:`Llama4NF4Experts`), metadata ``double_quant``, ``blocksize``.
    Next to a checkpoint folder, :func:`load_llama4_qlora` picks it up and skips re-quantizing the bf16 shards.

    Raises:
        ValueError: the model has no NF4 experts.
    """
    from safetensors.torch import save_file

    tensors, dq = {}, None
    for name, moe in _moe_modules(model):
        if isinstance(moe.experts, Llama4NF4Experts):
            i = int(re.search(r"layers\.(\d+)\.", name).group(1))
            dq = moe.experts.double_quant
            for bname, buf in moe.experts.named_buffers():
                tensors[f"layers.{i}.{bname}"] = buf.detach().contiguous().cpu()
    if not tensors:
        raise ValueError("no NF4 routed experts in this model (prepare it with quantize_experts=True)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / EXPERTS_FILE
    save_file(tensors, str(path), metadata={"double_quant": str(dq), "blocksize": str(NF4_BLOCKSIZE)})
    return path

