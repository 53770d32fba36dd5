"""Shared pieces of sparse expert dispatch: routing counts on the host or the device, grouped-GEMM offsets, the NF4
code table, and reassembling per-group row blocks. Used by :mod:`medtune.llama4` (the MoE and NF4 experts) and
:mod:`medtune.llama4.expert_lora` (LoRA on them); no import of either, so neither depends on the other's internals."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["assemble", "check_counts", "grouped_mm_ok", "host_counts", "nf4_code", "offsets"]


def grouped_mm_ok(x: torch.Tensor) -> bool:
    """True where ``torch._grouped_mm`` serves x: CUDA, bf16, compute capability 9.0+ (Hopper)."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


def host_counts(counts: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    """``counts`` as a tuple of Python ints (a device tensor costs one host sync here)."""
    return tuple(int(c) for c in (counts.tolist() if isinstance(counts, torch.Tensor) else counts))


def offsets(counts: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """End row of each expert's group, (E,) int32 on ``device``, as ``torch._grouped_mm``'s ``offs`` wants.
    From a device tensor: no host sync."""
    if isinstance(counts, torch.Tensor):
        return counts.to(device).cumsum(0, dtype=torch.int32)
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def check_counts(x: torch.Tensor, counts: Sequence[int] | torch.Tensor, num_experts: int) -> None:
    """Validate routing counts. A tensor is checked for its length only (its sum would cost a host sync)."""
    if isinstance(counts, torch.Tensor):
        ok = counts.shape == (num_experts,)
    else:
        ok = len(counts) == num_experts and sum(counts) == x.shape[0]
    if not ok:
        shown = tuple(counts.shape) if isinstance(counts, torch.Tensor) else list(counts)
        raise ValueError(f"counts must hold {num_experts} token counts summing to {x.shape[0]} rows, got {shown}")


_NF4_CODE: dict[torch.device, torch.Tensor] = {}


def nf4_code(device: torch.device) -> torch.Tensor:
    """bitsandbytes' 16-value NF4 table, float32 (16,) on ``device`` (``functional.get_4bit_type("nf4")``), cached."""
    import bitsandbytes.functional as bnbf

    if device not in _NF4_CODE:
        _NF4_CODE[device] = bnbf.get_4bit_type("nf4", device=device)
    return _NF4_CODE[device]


def assemble(parts: list[tuple[slice, torch.Tensor]], zeros) -> torch.Tensor:
    """One (N, H) tensor from per-group row blocks: a single block of all rows as it is (no copy), else the
    blocks written into ``zeros()`` (rows of groups without tokens stay 0)."""
    if len(parts) == 1 and parts[0][0] == slice(None):
        return parts[0][1]
    out = zeros()
    for rows, block in parts:
        out[rows] = block
    return out
