"""bitsandbytes NF4 ``Linear4bit`` layers through :func:`medtune.llama4.kernels.nf4_linear` while decoding.

Why: for two or more input rows bitsandbytes' ``matmul_4bit`` dequantizes the whole weight to bf16 and runs a GEMM,
so a decode step at batch 8 or 32 writes and reads a bf16 copy of every attention and shared-expert projection
(Scout: ~0.5 GB per layer, ~24 GB per step). The kernel multiplies straight from the packed bytes. For one row
bitsandbytes has its own ``gemv_4bit``; :data:`ROWS` says which row counts use ours (measured by
scripts/device/decode_gpu.py, docs/bench-generate.md).

:func:`fast_nf4_linears` swaps the ``forward`` of each eligible layer (NF4, blocksize 64, no double quant, CUDA) for
the time of a ``with`` block; inside, calls with gradients wanted, on the CPU, or with a row count outside
:data:`ROWS` go to bitsandbytes as before. PEFT's LoRA wrappers call the base layer's ``forward``, so an unmerged
adapter keeps working on top.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from medtune.llama4 import kernels

__all__ = ["ROWS", "eligible", "fast_nf4_linears", "nf4_linear_forward"]


def _rows_from_env() -> tuple[int, int]:
    lo, _, hi = os.environ.get("MEDTUNE_NF4_LINEAR_ROWS", "2-64").partition("-")
    return int(lo), int(hi or lo)


ROWS: tuple[int, int] = _rows_from_env()  # (fewest, most) input rows sent to the kernel; env MEDTUNE_NF4_LINEAR_ROWS


def eligible(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` whose weight the kernel reads: NF4, 64-weight blocks, float32 absmax
    (no double quant), shape (out_features, in_features), on CUDA (or anywhere under Triton's interpreter: tests)."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return False
    if not isinstance(module, bnb.nn.Linear4bit):
        return False
    qs = getattr(module.weight, "quant_state", None)
    return (qs is not None and qs.quant_type == "nf4" and qs.blocksize == 64 and not qs.nested
            and qs.absmax.dtype == torch.float32 and (module.weight.is_cuda or kernels.interpreted())
            and module.weight.dtype == torch.uint8
            and tuple(qs.shape) == (module.out_features, module.in_features) and kernels.available())


def nf4_linear_forward(module: nn.Module, x: torch.Tensor, fallback) -> torch.Tensor:
    """``module(x)`` for an :func:`eligible` layer: x (..., in_features) -> (..., out_features) in x's dtype,
    computed in the layer's ``compute_dtype`` with fp32 accumulation; ``fallback(x)`` (bitsandbytes) when the
    kernel failed to build or launch in this process (:func:`medtune.llama4.kernels.guarded`), gradients are
    wanted, x is not on CUDA (outside Triton's interpreter), or its row count is outside :data:`ROWS`."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    on_device = x.is_cuda or kernels.interpreted()
    if (torch.is_grad_enabled() and x.requires_grad) or not on_device or not ROWS[0] <= rows <= ROWS[1]:
        return fallback(x)
    qs = module.weight.quant_state
    flat = x.reshape(rows, x.shape[-1]).to(module.compute_dtype or x.dtype).contiguous()
    y = kernels.guarded("nf4_linear", kernels.nf4_linear, flat, module.weight.data.view(-1), qs.absmax, qs.code,
                        n_out=module.out_features)
    if y is None:
        return fallback(x)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y.view(*x.shape[:-1], module.out_features).to(x.dtype)


@contextlib.contextmanager
def fast_nf4_linears(model: nn.Module) -> Iterator[int]:
    """Route every :func:`eligible` ``Linear4bit`` of ``model`` through :func:`nf4_linear_forward` inside the block;
    yields how many layers were routed. The original ``forward``s are restored on exit, also after an error."""
    patched = []
    for module in model.modules():
        if eligible(module) and "forward" not in vars(module):
            original = module.forward
            module.forward = lambda x, m=module, f=original: nf4_linear_forward(m, x, f)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
