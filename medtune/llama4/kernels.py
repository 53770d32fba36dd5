"""Triton kernels for NF4 routed experts: dequantize, and multiply straight from the packed 4-bit bytes.

NF4 storage (bitsandbytes ``quantize_4bit(W, blocksize=64, quant_type="nf4")``, ``W`` (K, N) row-major): the K*N
weights flattened row by row, two 4-bit codes per byte (element 2i in the high nibble, 2i+1 in the low one), one
float32 ``absmax`` per 64 consecutive weights; weight = ``code[q] * absmax`` with ``code`` bitsandbytes' 16-value
NF4 table (``bitsandbytes.functional.get_4bit_type("nf4")``). Experts of one projection are stored back to back
(``packed`` (E, K*N/2) uint8, ``absmax`` (E, K*N/64) float32), so global byte ``i`` of expert ``e``'s matrix has
its scale at ``absmax.flat[i // 32]``.

Two kernels:

- :func:`nf4_dequantize`: packed bytes -> a dense bf16/fp16/fp32 tensor, bit-identical to bitsandbytes'
  ``dequantize_4bit`` (float32 ``code[q] * absmax``, rounded once). Training uses it (all experts, then
  ``torch._grouped_mm``).
- :func:`nf4_moe_matmul`: ``y = x @ W_e`` for rows sorted by expert, ``W_e`` read once per tile from the packed
  bytes and dequantized in registers; only experts that received rows are read (those with none cost one early
  return). ``gated=True`` computes a whole Llama 4 expert's first half, ``silu(x @ W_gate) * (x @ W_up)`` with
  ``W = [W_gate | W_up]`` (K, 2N) as transformers' ``gate_up_proj``. Decoding and small batches use it: their cost is
  reading the weights (a token at batch 1 touches one expert of 16), which the dequantize-everything path does
  16 times over, plus a bf16 copy written and read back.

Tile mapping (as vLLM's fused MoE sorts tokens into per-expert blocks, here without a separate alignment pass):
program ``(m, n)`` finds its expert from the per-expert row counts in the kernel (counts -> blocks of ``BM`` rows
-> inclusive cumulative sum), so the launch needs no host copy of the counts and can be captured in a CUDA graph;
the grid has ``cdiv(rows, BM) + E`` row blocks, enough for any routing.

Both run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``), which is how the tests check their numerics
without a GPU.
"""

from __future__ import annotations

import torch

__all__ = ["available", "nf4_dequantize", "nf4_moe_matmul", "pick_blocks"]

NF4_BYTES_PER_ABSMAX = 32  # 64 weights per absmax block, 2 weights per byte

try:  # Triton comes with CUDA builds of torch; on the CPU it is a test dependency (interpreter mode)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = tl = None


def available() -> bool:
    """True when Triton imports (on a GPU box, or on the CPU with ``TRITON_INTERPRET=1``)."""
    return triton is not None


if triton is not None:
    @triton.jit
    def dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes,
                          BLOCK: tl.constexpr, BYTES_PER_ABSMAX: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + offs // BYTES_PER_ABSMAX, mask=mask, other=0.0)
        hi = tl.load(code_ptr + (byte >> 4)) * scale  # element 2i: high nibble, as bitsandbytes packs
        lo = tl.load(code_ptr + (byte & 15)) * scale  # element 2i + 1: low nibble
        vals = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty)
        out_offs = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_offs, vals, mask=out_offs < 2 * n_bytes)

    @triton.jit
    def dequant_tile(packed_ptr, absmax_ptr, code_ptr, byte_idx, BYTES_PER_ABSMAX: tl.constexpr):
        """(BK, BN/2) global byte indices -> (BK, BN) float32 weights (columns 2j, 2j+1 from byte j)."""
        byte = tl.load(packed_ptr + byte_idx).to(tl.int32)
        scale = tl.load(absmax_ptr + byte_idx // BYTES_PER_ABSMAX)
        hi = tl.load(code_ptr + (byte >> 4)) * scale
        lo = tl.load(code_ptr + (byte & 15)) * scale
        return tl.interleave(hi, lo)

    @triton.jit
    def moe_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, counts_ptr, out_ptr,
                          stride_x, stride_out, K: tl.constexpr, N_OUT: tl.constexpr, ROW_BYTES: tl.constexpr,
                          EXPERT_BYTES: tl.constexpr, E: tl.constexpr, E_POW2: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          BYTES_PER_ABSMAX: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # which expert this row block belongs to, from the counts alone (no host sync, graph-capturable)
        eidx = tl.arange(0, E_POW2)
        cnt = tl.load(counts_ptr + eidx, mask=eidx < E, other=0).to(tl.int32)
        nblk = (cnt + BM - 1) // BM
        cum = tl.cumsum(nblk, 0)
        e = tl.sum((cum <= pid_m).to(tl.int32), 0)
        if e >= E:  # a spare block: the grid is sized for the worst routing
            return
        first_blk = tl.sum(tl.where(eidx == e, cum - nblk, 0), 0)
        row0 = tl.sum(tl.where(eidx < e, cnt, 0), 0)
        n_e = tl.sum(tl.where(eidx == e, cnt, 0), 0)
        local = (pid_m - first_blk) * BM + tl.arange(0, BM)
        rmask = local < n_e
        rows = (row0 + local).to(tl.int64)

        offs_k = tl.arange(0, BK)
        col_byte = pid_n * (BN // 2) + tl.arange(0, BN // 2)  # byte column of the output tile's first part
        base = e.to(tl.int64) * EXPERT_BYTES
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + offs_k
            a = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=rmask[:, None], other=0.0)
            byte_idx = base + kk.to(tl.int64)[:, None] * ROW_BYTES + col_byte[None, :]
            w = dequant_tile(packed_ptr, absmax_ptr, code_ptr, byte_idx, BYTES_PER_ABSMAX).to(a.dtype)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            if GATED:  # up projection: the same rows, columns N_OUT further on
                w_up = dequant_tile(packed_ptr, absmax_ptr, code_ptr, byte_idx + N_OUT // 2,
                                    BYTES_PER_ABSMAX).to(a.dtype)
                if IEEE:
                    acc_up = tl.dot(a, w_up, acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(a, w_up, acc_up)
        out_ty = out_ptr.dtype.element_ty
        if GATED:
            # round where PyTorch's bf16 ops would (g, u from the matmul; silu(g); the product) so that the result
            # matches dequantize + grouped_mm + ACT2FN["silu"] up to the matmul's summation order
            g = acc.to(out_ty).to(tl.float32)
            u = acc_up.to(out_ty).to(tl.float32)
            act = (g * tl.sigmoid(g)).to(out_ty).to(tl.float32)
            acc = act * u
        cols = pid_n * BN + tl.arange(0, BN)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ty), mask=rmask[:, None])


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor | None:
    """NF4 -> ``dtype`` in one pass: bit-identical to bitsandbytes' ``dequantize_4bit`` (module doc).

    Args:
        packed: uint8 (n/2,), contiguous: two codes per byte, high nibble first.
        absmax: float32 (n/64,), contiguous.
        code: float32 (16,), the NF4 table.
        shape: output shape, n elements.
        dtype: bf16, fp16 or fp32.

    Returns:
        (``shape``) ``dtype`` on ``packed``'s device, or None when Triton is unavailable.
    """
    if triton is None:
        return None
    kernel = dequantize_kernel
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_bytes, block = packed.numel(), 2048
    kernel[(triton.cdiv(n_bytes, block),)](packed, absmax, code, out, n_bytes, BLOCK=block,
                                           BYTES_PER_ABSMAX=NF4_BYTES_PER_ABSMAX, num_warps=8)
    return out


def pick_blocks(k: int, n_out: int, rows: int) -> tuple[int, int, int] | None:
    """Tile sizes (BM, BN, BK) for :func:`nf4_moe_matmul`, or None when the shape does not tile (then use the
    dequantize path). BM 16 is ``tl.dot``'s smallest; BN 64 gives Scout's down projection (N 5,120) 80 column
    tiles and its gate/up (N 8,192) 128, about one per SM of an H100/H200 at batch 1; BK 128 keeps a tile's
    packed bytes (BK x BN/2) at 4 KiB. Tiles must divide K and N exactly (no masks on the weight loads)."""
    bm = 16 if rows <= 16 else 32 if rows <= 64 else 64
    bn = next((b for b in (64, 32, 16) if n_out % b == 0), None)
    bk = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
    if bn is None or bk is None:
        return None
    return bm, bn, bk


def nf4_moe_matmul(x: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                   code: torch.Tensor, *, k: int, n_out: int, gated: bool,
                   blocks: tuple[int, int, int] | None = None, num_warps: int = 4,
                   num_stages: int | None = None) -> torch.Tensor | None:
    """Rows sorted by expert times each expert's NF4 matrix, dequantized inside the matmul.

    Args:
        x: (N, k) bf16/fp16/fp32, row stride may differ from k (last dim contiguous); rows
            ``[sum(counts[:e]), sum(counts[:e+1]))`` belong to expert e.
        counts: (E,) integer tensor on x's device (not read on the host).
        packed: uint8 (E, k * w_cols / 2) contiguous, ``w_cols = 2 * n_out`` when ``gated`` else ``n_out``.
        absmax: float32 (E, k * w_cols / 64) contiguous.
        code: float32 (16,) NF4 table on x's device.
        k: inner dimension (rows of each expert's matrix).
        n_out: output columns (per half when ``gated``).
        gated: compute ``silu(x @ W[:, :n_out]) * (x @ W[:, n_out:])`` instead of ``x @ W``.
        blocks: (BM, BN, BK) tile sizes; default :func:`pick_blocks`.

    Returns:
        (N, n_out) in x's dtype (rows with no expert, i.e. beyond ``sum(counts)``, are not written), or None
        when Triton is unavailable or the shape does not tile (the caller falls back to dequantize + matmul).

    Raises:
        ValueError: ``packed``/``absmax`` do not hold (E, k * w_cols) NF4 weights, or ``x`` is not (N, k).
    """
    if triton is None:
        return None
    kernel = moe_matmul_kernel
    num_experts = packed.shape[0]
    w_cols = 2 * n_out if gated else n_out
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be (N, {k}) with a contiguous last dim, got {tuple(x.shape)} {x.stride()}")
    if packed.shape != (num_experts, k * w_cols // 2) or absmax.shape != (num_experts, k * w_cols // 64):
        raise ValueError(f"packed/absmax {tuple(packed.shape)}/{tuple(absmax.shape)} do not hold {num_experts} "
                         f"NF4 matrices of {k}x{w_cols}")
    blocks = blocks or pick_blocks(k, n_out, x.shape[0])
    if blocks is None:
        return None
    bm, bn, bk = blocks
    out = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    grid = (triton.cdiv(x.shape[0], bm) + num_experts, n_out // bn)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    # the matrix dimensions are compile-time constants: one build per projection shape (two per model), and
    # Triton's interpreter (numpy >= 2.4) cannot loop over a runtime-scalar range
    kernel[grid](x, packed, absmax, code, counts, out, x.stride(0), out.stride(0), K=k, N_OUT=n_out,
                 ROW_BYTES=w_cols // 2, EXPERT_BYTES=packed.shape[1], E=num_experts, E_POW2=triton.next_power_of_2(num_experts), GATED=gated,
                 IEEE=x.dtype == torch.float32, BM=bm, BN=bn, BK=bk, BYTES_PER_ABSMAX=NF4_BYTES_PER_ABSMAX,
                 num_warps=num_warps, **extra)
    return out
