"""LoRA on Llama 4's NF4 routed experts, set up, saved and loaded exactly as PEFT ``target_parameters``.

Configured as PEFT users do it on bf16 experts::

    LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
               target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"])

The update (per expert e, for the rows routed to it, sorted by expert as :class:`medtune.llama4.Llama4SparseMoe`
dispatches them; W1_e (H, 2I) and W2_e (I, H) frozen NF4)::

    [g | u] = x W1_e + s * (x L1_e) R1_e          x (n_e, H)
    h       = act(g) * u
    y       = h W2_e + s * (h L2_e) R2_e

with ``(L_e, R_e, s)`` = PEFT's ``ParamWrapper.get_delta_factors`` (peft 0.21.2, ``peft/tuners/lora/layer.py``): the
weight delta PEFT adds to a bf16 expert is ``delta_W_e = s * L_e @ R_e``, so ``x (W_e + delta_W_e)`` is the line
above, never formed densely here. ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora`` (PEFT's
``scaling``, ``rank_pattern``/``alpha_pattern`` included). PEFT's layout for a 3-D parameter (E, K, M) (gate_up: K=H,
M=2I; down: K=I, M=H; PEFT swaps in/out features for 3-D parameters): ``lora_A = nn.Linear(M, r*E)``, weight
(r*E, M), rows ``e*r .. e*r+r-1`` are R_e (r, M); ``lora_B = nn.Linear(r*E, K)``, weight (K, r*E), column ``j*E + e``
is L_e[:, j] for rank index j (rank-major, expert-minor). Two targets on one module nest: ``experts`` becomes
``ParamWrapper(down_proj, base_layer=ParamWrapper(gate_up_proj, base_layer=<experts>))``, adapter keys
``...feed_forward.experts.lora_A.weight`` (down) and ``...feed_forward.experts.base_layer.lora_A.weight`` (gate_up).

Mechanism (why PEFT's own wrapper is kept but its forward is not):

- PEFT finds a target by listing each module's own parameters (``named_parameters(recurse=False)``) and wraps the
  module in ``ParamWrapper``, which reads the parameter's shape, device and dtype. :class:`Llama4NF4Experts` holds
  packed uint8 buffers, so it answers with shape-only placeholders (:func:`placeholder`): ``nn.Parameter`` views of
  one zero expanded to (E, K, M), in ``compute_dtype`` on the buffers' device, no memory behind them. Only calls
  on the experts module itself (``experts.named_parameters()``/``parameters()``, which PEFT also uses to place the
  adapters, and attribute access ``experts.gate_up_proj``, PEFT's ``get_param``) show them; walks over an
  enclosing model (optimizer, ``state_dict``, ``.to()``, parameter counts, init loops) never see them. So
  ``get_peft_model``, ``PeftModel.from_pretrained`` and ``save_pretrained`` on the NF4 model build, load and write the
  same wrappers, keys and shapes as on bf16 experts, with no custom-module registration: an adapter moves between
  the two models either way (tests/llama4/test_expert_lora.py).
- ``ParamWrapper.forward`` would add ``delta_W`` to the weight through a parametrization, i.e. build the dense
  (E, K, M) weight, which NF4 cannot hold (and Scout's gate_up would be 2.5 GiB per layer). So
  :class:`Llama4SparseMoe` does not call the wrappers: it finds the NF4 module under them (:func:`nf4_under`), reads
  the active adapters' factors (:func:`active_factors`) and runs :func:`routed_forward`: the NF4 base through the
  same dequantize + per-group matmul as :class:`medtune.llama4._NF4ExpertsFunction` (frozen, one autograd
  Function that saves only its input and recomputes in backward), the low-rank terms only for experts that have
  rows (``torch._grouped_mm`` with the base's ``offs`` on CUDA bf16 sm90, no host sync; a per-expert loop
  elsewhere), so idle experts cost nothing and get zero LoRA gradient.
- With gradient checkpointing, :class:`Llama4SparseMoe` still skips the routed experts in the recompute: the
  Function saves the same tensors (input and factors) with ``compute=False`` and its backward recomputes
  everything, so gradients equal those without checkpointing.
- Inference (no gradient wanted, e.g. notebook 06 on an adapter loaded with ``PeftModel.from_pretrained``): on CUDA
  the frozen products take the NF4 experts' own sync-free paths (the fused kernel from the packed bytes, ungated,
  for few rows; all experts dequantized + ``torch._grouped_mm`` otherwise) and the LoRA terms ``torch._grouped_mm``,
  so a decode step needs no host sync when the rank is a multiple of 8 (bf16).

Dtypes: lora_A/lora_B as PEFT keeps them (fp32: PEFT upcasts bf16 adapters); the factors are cast to the experts'
``compute_dtype`` (bf16 on the GPU; ``get_delta_factors`` casts to the placeholder's dtype), the products run in it
(fp32 accumulation inside the matmuls) and the output is cast back to the input's dtype. PEFT on bf16 experts rounds
``W + delta_W`` to bf16 instead, so on the GPU the two agree to bf16 rounding, not bit for bit.

Size (Llama 4 Scout: E=16, H=5120, I=8192, 48 layers) at r=16 on both projections: per layer gate_up
A (256, 16384) + B (5120, 256) = 5,505,024 and down A (256, 5120) + B (8192, 256) = 3,407,872, i.e. 8,912,896;
427,819,008 trainable parameters (0.43B) for 48 layers: 0.80 GiB in bf16, 1.59 GiB in fp32 as PEFT keeps
adapters, ~6.4 GiB with fp32 gradients and AdamW's two moments (16 bytes/parameter). Per step the extra
activations are (rows, r) per projection; the backward dequantizes gate_up once more than the frozen base does.

Not supported (each refused loudly, by PEFT or here): merging into NF4 experts (``merge_and_unload`` writes into
the placeholder; merge into the bf16 base instead, :func:`medtune.stages.publish.export_merged`), ``lora_dropout``
> 0 (PEFT: the input cannot be factored out of a weight delta), DoRA and other variants, mixed-adapter batches,
NF4 experts under transformers' dense ``Llama4TextMoe`` (:func:`medtune.llama4.check_lora_config`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from medtune.llama4 import dispatch, kernels

__all__ = ["active_factors", "is_placeholder", "nf4_under", "placeholder", "placeholders", "routed_forward"]

PROJECTIONS = ("gate_up", "down")  # Llama4NF4Experts' names; PEFT's parameter names add "_proj"
_ZERO: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


# --------------------------------------------------------------------------------------------------------------
# Placeholders PEFT can wrap
# --------------------------------------------------------------------------------------------------------------


def placeholder(experts, name: str) -> nn.Parameter:
    """Shape-only stand-in for ``experts``' (a :class:`medtune.llama4.Llama4NF4Experts`) 3-D weight ``name``
    ("gate_up" or "down"): an ``nn.Parameter`` (requires_grad False) of shape (E, H, 2I) or (E, I, H), dtype
    ``experts.compute_dtype``, on the packed buffers' device, that is one shared zero expanded (every stride 0).

    What PEFT reads from it: shape (in/out features, number of experts), device and dtype (where and in which dtype
    it creates lora_A/lora_B). It holds no weight values; writing into it (PEFT ``merge``) raises.
    """
    packed = getattr(experts, f"{name}_packed")
    key = (packed.device, experts.compute_dtype)
    if key not in _ZERO:
        _ZERO[key] = torch.zeros((), dtype=experts.compute_dtype, device=packed.device)
    shape = (experts.num_experts, *experts.shapes[name])
    return nn.Parameter(_ZERO[key].expand(shape), requires_grad=False)


def is_placeholder(t: torch.Tensor) -> bool:
    """True for a :func:`placeholder` (a tensor of several elements, every stride 0: no memory of its own)."""
    return t.numel() > 1 and all(st == 0 for st in t.stride())


def placeholders(experts, prefix: str = "") -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, placeholder)`` for ``gate_up_proj`` then ``down_proj`` (transformers' ``Llama4TextExperts`` order,
    which fixes PEFT's nesting: the first one listed ends up innermost), names prefixed as ``named_parameters``
    does."""
    for name in PROJECTIONS:
        yield (f"{prefix}.{name}_proj" if prefix else f"{name}_proj"), placeholder(experts, name)


# --------------------------------------------------------------------------------------------------------------
# PEFT's wrappers: the NF4 module under them, the active factors
# --------------------------------------------------------------------------------------------------------------


def _is_param_wrapper(module) -> bool:
    # by class name, as PEFT itself checks it (peft.tuners.tuners_utils: "to avoid circular import")
    return type(module).__name__ == "ParamWrapper" and hasattr(module, "parameter_name")


def nf4_under(module):
    """The :class:`medtune.llama4.Llama4NF4Experts` that ``module`` is, or that PEFT's ``ParamWrapper``\\ s wrap
    (any depth); None for anything else (bf16 experts, wrapped or not)."""
    while _is_param_wrapper(module):
        module = module.base_layer
    return module if getattr(module, "is_nf4_experts", False) else None  # Llama4NF4Experts (no import: a cycle)


def active_factors(module) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The low-rank factors of the active adapters on the NF4 experts under ``module``, per projection.

    Returns:
        ``{"gate_up": (L, R) or None, "down": (L, R) or None}``: L (E, K, r_total) with the scaling folded in
        (``s * L_e``), R (E, r_total, M), contiguous, in the experts' compute dtype, autograd-connected to
        lora_B/lora_A (PEFT ``get_delta_factors``). Several active adapters are concatenated along the rank (the
        sum of their deltas, as PEFT adds them). None when no adapter is active (``disable_adapter()``, no wrapper).

    Raises:
        RuntimeError: an adapter is merged into the NF4 experts (not possible: they are not stored as weights).
    """
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {p: [] for p in PROJECTIONS}
    while _is_param_wrapper(module):
        if module.merged:
            raise RuntimeError("a LoRA adapter is marked merged into NF4 routed experts, which hold no weights to "
                               "merge into; merge into the bf16 base model instead (publish.export_merged)")
        name = module.parameter_name.removesuffix("_proj")
        if name not in parts:
            raise ValueError(f"unknown routed-expert parameter {module.parameter_name!r} for NF4 experts")
        if not module.disable_adapters:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    lhs, rhs, scaling = module.get_delta_factors(adapter)  # delta = scaling * lhs @ rhs
                    parts[name].append(((lhs * scaling).contiguous(), rhs.contiguous()))
        module = module.base_layer
    out: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
    for name, found in parts.items():
        if len(found) > 1:  # sum of the adapters' deltas: one product of rank r_1 + r_2 + ...
            out[name] = (torch.cat([f[0] for f in found], dim=-1), torch.cat([f[1] for f in found], dim=-2))
        else:
            out[name] = found[0] if found else None
    return out if any(v is not None for v in out.values()) else None


# --------------------------------------------------------------------------------------------------------------
# Per-expert products of the LoRA terms
# --------------------------------------------------------------------------------------------------------------


class _Routing:
    """Rows sorted by expert, ``counts`` (E,) rows per expert: per-expert products for the LoRA terms.

    ``mm(a (N, K), w (E, K, M)) -> (N, M)``: expert e's rows times w[e]. ``wgrad(a (N, K), b (N, M)) -> (E, K, M)``:
    a_e^T b_e per expert, zeros for experts without rows. On CUDA bf16 sm90 (``_grouped_mm_ok``) with 16-byte aligned
    dims: ``torch._grouped_mm`` with ``offs`` from the device counts (no host sync; wgrad is its 2-D x 2-D form,
    groups along K). Elsewhere a loop over the experts that have rows (the counts read on the host once).
    """

    def __init__(self, x: torch.Tensor, counts: Sequence[int] | torch.Tensor, num_experts: int):
        self.counts, self.num_experts, self.device = counts, num_experts, x.device
        self.grouped = dispatch.grouped_mm_ok(x)
        self._offs = self._spans = None

    def offs(self) -> torch.Tensor:
        if self._offs is None:
            self._offs = dispatch.offsets(self.counts, self.device)
        return self._offs

    def spans(self) -> list[tuple[int, int, int]]:
        """(expert, first row, end row) of every expert that has rows."""
        if self._spans is None:
            spans, start = [], 0
            for e, n in enumerate(dispatch.host_counts(self.counts)):
                if n:
                    spans.append((e, start, start + n))
                    start += n
            self._spans = spans
        return self._spans

    def _aligned(self, *dims: int, dtype: torch.dtype) -> bool:
        step = 16 // dtype.itemsize  # _grouped_mm: strides in multiples of 16 bytes
        return self.grouped and all(d % step == 0 for d in dims)

    def mm(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._aligned(a.shape[1], w.shape[-1], dtype=a.dtype):
            return torch._grouped_mm(a, w, offs=self.offs())
        outs = [a[s:t] @ w[e] for e, s, t in self.spans()]
        return torch.cat(outs) if outs else a.new_zeros(0, w.shape[-1])

    def wgrad(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._aligned(a.shape[1], b.shape[1], dtype=a.dtype):
            out = torch._grouped_mm(a.t(), b, offs=self.offs())
            counts = self.counts if isinstance(self.counts, torch.Tensor) else torch.tensor(self.counts)
            # experts without rows: make sure they read 0 (device mask, no sync)
            return out.masked_fill_((counts.to(out.device) == 0)[:, None, None], 0)
        out = a.new_zeros(self.num_experts, a.shape[1], b.shape[1])
        for e, s, t in self.spans():
            out[e] = a[s:t].t() @ b[s:t]
        return out


def _base(experts, name: str, a: torch.Tensor, counts, *, transpose: bool = False) -> torch.Tensor:
    """The frozen NF4 product of projection ``name`` for rows ``a`` (N, K) sorted by expert: ``a @ W_e`` (or
    ``a @ W_e^T`` with ``transpose``), dequantizing per group of experts exactly as ``_NF4ExpertsFunction`` does
    (``Llama4NF4Experts._groups``); (N, M) in ``a``'s dtype, each dequantized group freed after use. With
    ``Llama4NF4Experts.fused_gemm`` (CUDA) it multiplies straight from the packed bytes instead
    (:meth:`Llama4NF4Experts.gemm`), as ``_NF4ExpertsFunction`` does."""
    if experts._use_gemm(a):
        out = experts.gemm(name, a, counts, transpose=transpose)
        if out is not None:
            return out
    k, m = experts.shapes[name]
    parts = []
    for rows, group, mm in experts._groups(a, counts):
        w = experts.dequantize_experts(name, *group)
        parts.append((rows, mm(a[rows], w.transpose(-2, -1) if transpose else w)))
        del w
    return dispatch.assemble(parts, lambda: a.new_zeros(a.shape[0], k if transpose else m))


# --------------------------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------------------------


class _NF4LoraExpertsFunction(torch.autograd.Function):
    """NF4 routed experts plus per-expert LoRA on gate_up and/or down (module doc for the formula).

    apply(x (N, H) compute dtype, experts, counts, compute: bool, l1, r1, l2, r2) -> (N, H), where (l1, r1) are the
    gate_up factors (E, H, r1) and (E, r1, 2I) with the scaling in l1, (l2, r2) the down factors (E, I, r2) and
    (E, r2, H); a pair may be None (projection not targeted). Saves x and the factors only; backward recomputes the
    expert forward (as ``_NF4ExpertsFunction``). ``compute=False`` (checkpoint recompute) saves the same and
    returns zeros. Gradients (per expert e, its rows; t1 = x l1, t2 = h l2)::

        dR2 = t2^T dy                 dL2 = h^T (dy R2^T)           dh = dy W2^T + (dy R2^T) L2^T
        dg = act'(g) * u * dh         du = act(g) * dh              dgu = [dg | du]
        dR1 = t1^T dgu                dL1 = x^T (dgu R1^T)          dx = dgu W1^T + (dgu R1^T) L1^T
    """

    @staticmethod
    def forward(ctx, x, experts, counts, compute, l1, r1, l2, r2):
        ctx.save_for_backward(x, l1, r1, l2, r2)
        ctx.experts, ctx.counts = experts, counts
        if not compute:
            return x.new_zeros(x.shape[0], experts.hidden_size)
        return _forward(experts, x, counts, l1, r1, l2, r2, base=_base)

    @staticmethod
    def backward(ctx, grad_out):
        x, l1, r1, l2, r2 = ctx.saved_tensors
        experts, counts = ctx.experts, ctx.counts
        need_x, need_1, need_2 = ctx.needs_input_grad[0], any(ctx.needs_input_grad[4:6]), any(ctx.needs_input_grad[6:8])
        route = _Routing(x, counts, experts.num_experts)
        dy = grad_out.to(x.dtype)
        dl1 = dr1 = dl2 = dr2 = dx = None

        dh = _base(experts, "down", dy, counts, transpose=True)  # (N, I)
        dyr = None
        if l2 is not None:
            dyr = route.mm(dy, r2.transpose(-2, -1))  # (N, r2)
            dh += route.mm(dyr, l2.transpose(-2, -1))

        gu = _base(experts, "gate_up", x, counts)  # recompute (N, 2I)
        t1 = None
        if l1 is not None:
            t1 = route.mm(x, l1)
            gu += route.mm(t1, r1)
        g, u = gu.chunk(2, dim=-1)
        with torch.enable_grad():
            g = g.detach().requires_grad_(True)
            a = experts.act_fn(g)
            (dg,) = torch.autograd.grad(a, g, dh * u)
        a = a.detach()
        if l2 is not None and need_2:
            h = a * u
            dr2 = route.wgrad(route.mm(h, l2), dy)
            dl2 = route.wgrad(h, dyr)
            del h
        dgu = torch.cat([dg, dh * a], dim=-1)  # (N, 2I)
        del gu, g, u, a, dg, dh
        if need_x:
            dx = _base(experts, "gate_up", dgu, counts, transpose=True)  # (N, H)
        if l1 is not None and (need_x or need_1):
            dgur = route.mm(dgu, r1.transpose(-2, -1))  # (N, r1)
            if need_1:
                dr1 = route.wgrad(t1, dgu)
                dl1 = route.wgrad(x, dgur)
            if need_x:
                dx += route.mm(dgur, l1.transpose(-2, -1))
        return dx, None, None, None, dl1, dr1, dl2, dr2


def _forward(experts, x, counts, l1, r1, l2, r2, *, base) -> torch.Tensor:
    """y (N, H) = the module doc's formula; ``base(experts, name, a, counts)`` computes the frozen NF4 products."""
    route = _Routing(x, counts, experts.num_experts)
    gu = base(experts, "gate_up", x, counts)
    if l1 is not None:
        gu += route.mm(route.mm(x, l1), r1)
    g, u = gu.chunk(2, dim=-1)
    h = experts.act_fn(g) * u
    del gu, g, u
    y = base(experts, "down", h, counts)
    if l2 is not None:
        y += route.mm(route.mm(h, l2), r2)
    return y


def _inference_base(experts, counts: torch.Tensor, fused: bool):
    """Frozen NF4 products for inference without a host sync (decode steps can be captured in a CUDA graph): the
    fused kernel straight from the packed bytes (few rows on CUDA, :meth:`Llama4NF4Experts.fused_forward`'s kernel,
    ungated), or every expert dequantized + ``torch._grouped_mm`` (:meth:`Llama4NF4Experts.grouped_forward`)."""
    num = experts.num_experts

    def fused_base(experts, name, a, counts_):
        k, m = experts.shapes[name]
        out = kernels.guarded("nf4_moe_matmul", kernels.nf4_moe_matmul, a, counts,
                                 getattr(experts, f"{name}_packed"), experts._absmax(name, 0, num).view(num, -1),
                                 dispatch.nf4_code(a.device), k=k, n_out=m, gated=False)
        if out is None:
            raise _NoFusedKernel
        return out

    def grouped_base(experts, name, a, counts_):
        out = experts.gemm(name, a, counts) if experts._use_gemm(a) else None
        if out is not None:
            return out
        return torch._grouped_mm(a, experts.dequantize_experts(name), offs=dispatch.offsets(counts, a.device))

    return fused_base if fused else grouped_base


class _NoFusedKernel(Exception):
    """The fused kernel is off in this process (``kernels.guarded``): take the dequantize path."""


def routed_forward(module, experts, hidden_states: torch.Tensor, counts: Sequence[int] | torch.Tensor, *,
                   output_needed: bool = True) -> torch.Tensor:
    """The routed experts' output for rows sorted by expert, with the active LoRA adapters on top.

    Args:
        module: what the MoE holds as ``experts``: the NF4 module itself or PEFT's ``ParamWrapper``\\ s around it.
        experts: that NF4 module (:func:`nf4_under`).
        hidden_states: (N, H) rows sorted by expert, any float dtype (computed in ``experts.compute_dtype``).
        counts: (E,) rows per expert, an integer tensor (e.g. on the GPU: no host sync on the grouped path) or E ints.
        output_needed: False inside a gradient-checkpoint recompute (:class:`medtune.llama4.Llama4SparseMoe`):
            returns zeros, keeps what backward needs.

    Returns:
        (N, H) in ``hidden_states``' dtype. Without an active adapter exactly ``experts(hidden_states, counts,
        output_needed=...)``. With one: training (gradients wanted) goes through one autograd Function (module
        doc); inference on CUDA uses the NF4 experts' sync-free paths (fused kernel for few rows, else dequantize +
        grouped GEMM) plus grouped LoRA products.

    Raises:
        ValueError: ``counts`` do not match the experts or the rows.
    """
    factors = active_factors(module) if module is not experts else None
    if factors is None:
        return experts(hidden_states, counts, output_needed=output_needed)
    dispatch.check_counts(hidden_states, counts, experts.num_experts)
    x = hidden_states.to(experts.compute_dtype).contiguous()
    if not isinstance(counts, torch.Tensor):
        counts = tuple(int(c) for c in counts)
    (l1, r1), (l2, r2) = (factors[p] or (None, None) for p in PROJECTIONS)
    tensors = [t for t in (x, l1, r1, l2, r2) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and isinstance(counts, torch.Tensor):
        paths = [fused for fused, ok in ((True, experts._use_fused(x)), (False, experts._inference_grouped(x, counts)))
                 if ok]
        for fused in paths:
            try:
                out = _forward(experts, x, counts, l1, r1, l2, r2, base=_inference_base(experts, counts, fused))
                return out.to(hidden_states.dtype)
            except _NoFusedKernel:
                continue
    out = _NF4LoraExpertsFunction.apply(x, experts, counts, bool(output_needed), l1, r1, l2, r2)
    return out.to(hidden_states.dtype)
