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
  return). It is a GEMV on the CUDA cores, built for decoding (one to a few rows per expert): each program owns
  ``2 BNB`` output columns of one expert for ``BM`` of its rows and a share of K, multiplies every weight as it
  is dequantized and accumulates elementwise in float32, reducing over K once at the end (no ``tl.dot``: with so
  few rows the matrix units would idle and the dequantized tile would have to be rearranged for them). The K
  shares are summed with fp32 atomics; ``gated=True`` then applies ``silu(x @ W_gate) * (x @ W_up)`` in PyTorch,
  with ``W = [W_gate | W_up]`` (K, 2N) as transformers' ``gate_up_proj``. Its cost should be reading the packed
  weights of the experts the rows touch (one of 16 per layer at batch 1): docs/bench-generate.md has the
  measured fraction of the memory bandwidth. Larger batches (prefill, scoring) use dequantize +
  ``torch._grouped_mm`` (``Llama4NF4Experts``), where the matrix units pay off.

Tile mapping (as vLLM's fused MoE sorts tokens into per-expert blocks, here without a separate alignment pass):
program ``(m, n, k)`` finds its expert from the per-expert row counts in the kernel (counts -> blocks of ``BM``
rows -> inclusive cumulative sum), so the launch needs no host copy of the counts and can be captured in a CUDA
graph; the grid has ``cdiv(rows, BM) + E`` row blocks, enough for any routing.

Both run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``), which is how the tests check their numerics
without a GPU.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["available", "failed", "guarded", "nf4_dequantize", "nf4_moe_gemm", "nf4_moe_matmul",
           "pick_blocks", "reset_failures"]

NF4_BYTES_PER_ABSMAX = 32  # 64 weights per absmax block, 2 weights per byte

try:  # Triton comes with CUDA builds of torch; on the CPU it is a test dependency (interpreter mode)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = tl = None


def available() -> bool:
    """True when Triton imports (on a GPU box, or on the CPU with ``TRITON_INTERPRET=1``)."""
    return triton is not None


_FAILED: dict[str, str] = {}  # kernel name -> the error that turned it off for this process


def guarded(name: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None once kernel ``name`` has failed to build or launch in this process.

    Why: a Triton kernel that does not compile or launch on an untested GPU, driver or Triton version must not crash
    a run after an hour of download and training; the callers fall back to their library path (bitsandbytes,
    dequantize + matmul) when they get None. The first failure is logged as a warning with the error; later calls
    skip the kernel. ``ValueError`` and ``TypeError`` (wrong arguments: a bug in the caller) are raised as usual.
    """
    if name in _FAILED:
        return None
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError):
        raise
    except Exception as err:  # noqa: BLE001 - any build or launch failure: fall back, say so once
        _FAILED[name] = f"{type(err).__name__}: {err}"
        logger.warning("Triton kernel %s failed (%s); using the library path for the rest of this process",
                       name, _FAILED[name][:500])
        return None


def failed() -> dict[str, str]:
    """Kernels turned off by :func:`guarded` in this process, with their errors (empty when all work)."""
    return dict(_FAILED)


def reset_failures() -> None:
    """Turn every kernel that :func:`guarded` turned off back on (after fixing the cause, or in tests)."""
    _FAILED.clear()


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
    def expert_rows(counts_ptr, pid_m, n_rows, E: tl.constexpr, E_POW2: tl.constexpr, BM: tl.constexpr):
        """Block ``pid_m`` of BM rows -> (its expert e, the rows' int64 indices [BM], their mask [BM]), from the
        per-expert counts alone (no host sync, graph-capturable): counts -> blocks of BM rows -> inclusive
        cumulative sum. e >= E marks a spare block (the grid is sized for the worst routing). The mask also keeps
        rows below ``n_rows``: counts are not checked on the host (a sync), so wrong ones must not read outside."""
        eidx = tl.arange(0, E_POW2)
        cnt = tl.maximum(tl.load(counts_ptr + eidx, mask=eidx < E, other=0).to(tl.int32), 0)
        nblk = (cnt + BM - 1) // BM
        cum = tl.cumsum(nblk, 0)
        e = tl.sum((cum <= pid_m).to(tl.int32), 0)
        first_blk = tl.sum(tl.where(eidx == e, cum - nblk, 0), 0)
        row0 = tl.sum(tl.where(eidx < e, cnt, 0), 0)
        n_e = tl.sum(tl.where(eidx == e, cnt, 0), 0)
        local = (pid_m - first_blk) * BM + tl.arange(0, BM)
        rmask = (local < n_e) & (row0 + local < n_rows)
        return e, (row0 + local).to(tl.int64), rmask

    @triton.jit
    def moe_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, counts_ptr, out_ptr, n_rows, stride_x, stride_out,
                        ROW_BYTES: tl.constexpr, EXPERT_BYTES: tl.constexpr, E: tl.constexpr, E_POW2: tl.constexpr,
                        BM: tl.constexpr, G: tl.constexpr, W: tl.constexpr, BK: tl.constexpr,
                        K_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, ROUND: tl.constexpr,
                        BYTES_PER_ABSMAX: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        e, rows, rmask = expert_rows(counts_ptr, pid_m, n_rows, E, E_POW2, BM)
        if e >= E:  # a spare block: the grid is sized for the worst routing
            return

        # the tile is BK weight rows x G groups of W packed bytes (W divides the 32 bytes of one absmax block, so a
        # group has one scale). Every weight is multiplied on the CUDA cores and accumulated elementwise in fp32
        # ([BM, BK, G, W]); the K reduction happens once, after the loop. High nibbles are the even output columns,
        # low nibbles the odd ones.
        offs_k = tl.arange(0, BK)
        col0 = pid_n * (G * W) + tl.arange(0, G) * W  # first byte of each group, [G]
        col = col0[:, None] + tl.arange(0, W)[None, :]  # [G, W]
        base = e.to(tl.int64) * EXPERT_BYTES
        acc_hi = tl.zeros((BM, BK, G, W), dtype=tl.float32)
        acc_lo = tl.zeros((BM, BK, G, W), dtype=tl.float32)
        for i in range(0, K_SPLIT, BK):  # this program's share of K
            kk = (pid_k * K_SPLIT + i + offs_k).to(tl.int64)
            byte = tl.load(packed_ptr + base + kk[:, None, None] * ROW_BYTES + col[None, :, :]).to(tl.int32)
            scale = tl.load(absmax_ptr + (base + kk[:, None] * ROW_BYTES + col0[None, :]) // BYTES_PER_ABSMAX)
            w_hi = tl.load(code_ptr + (byte >> 4)) * scale[:, :, None]
            w_lo = tl.load(code_ptr + (byte & 15)) * scale[:, :, None]
            if ROUND:  # the weight rounded to x's dtype, as dequantize-then-matmul sees it
                w_hi = w_hi.to(x_ptr.dtype.element_ty).to(tl.float32)
                w_lo = w_lo.to(x_ptr.dtype.element_ty).to(tl.float32)
            xv = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=rmask[:, None], other=0.0)
            xb = xv.to(tl.float32)[:, :, None, None]
            acc_hi += xb * w_hi[None, :, :, :]
            acc_lo += xb * w_lo[None, :, :, :]
        # [BM, G, W] -> [BM, G * W]: the groups are consecutive bytes
        res_hi = tl.reshape(tl.sum(acc_hi, axis=1), (BM, G * W))
        res_lo = tl.reshape(tl.sum(acc_lo, axis=1), (BM, G * W))
        out = out_ptr + rows[:, None] * stride_out + 2 * (pid_n * (G * W) + tl.arange(0, G * W))[None, :]
        # the mask in the values' full shape: Triton's interpreter does not broadcast an atomic's mask
        omask = rmask[:, None] & (tl.arange(0, G * W) >= 0)[None, :]
        if SPLIT_K == 1:
            tl.store(out, res_hi, mask=omask)
            tl.store(out + 1, res_lo, mask=omask)
        else:
            tl.atomic_add(out, res_hi, mask=omask, sem="relaxed")
            tl.atomic_add(out + 1, res_lo, mask=omask, sem="relaxed")

    @triton.jit
    def moe_gemm_kernel(a_ptr, packed_ptr, absmax_ptr, code_ptr, counts_ptr, out_ptr, n_rows, stride_a, stride_out,
                        ROW_BYTES: tl.constexpr, EXPERT_BYTES: tl.constexpr, E: tl.constexpr, E_POW2: tl.constexpr,
                        TRANS: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
                        BC: tl.constexpr, STEPS: tl.constexpr, BYTES_PER_ABSMAX: tl.constexpr,
                        PRECISION: tl.constexpr):
        # TRANS False: out[rows, c0:c0+BC] = a[rows, :] @ W_e[:, c0:c0+BC], looping over W's rows (K) in BR steps.
        # TRANS True:  out[rows, r0:r0+BR] = a[rows, :] @ W_e[r0:r0+BR, :]^T, looping over W's columns in BC steps.
        # W_e is read as [BR, BC] tiles from the packed bytes (BC / 2 bytes per weight row, BC / 64 scales) and
        # dequantized in registers exactly as nf4_dequantize rounds it, then fed to tl.dot (fp32 accumulation).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e, rows, rmask = expert_rows(counts_ptr, pid_m, n_rows, E, E_POW2, BM)
        if e >= E:  # a spare block: the grid is sized for the worst routing
            return
        base = e.to(tl.int64) * EXPERT_BYTES
        half = tl.arange(0, BC // 2)
        groups = tl.arange(0, BC // 64)
        if TRANS:
            acc = tl.zeros((BM, BR), dtype=tl.float32)
            wr = (pid_n * BR + tl.arange(0, BR)).to(tl.int64)
        else:
            acc = tl.zeros((BM, BC), dtype=tl.float32)
            wc0 = pid_n * (BC // 2)
        for i in range(STEPS):  # compile-time trip count: W's columns / BC (TRANS) or rows / BR
            if TRANS:
                b0 = i * (BC // 2)  # first byte of this column block in each weight row
                a_cols = i * BC + tl.arange(0, BC)
            else:
                wr = (i * BR + tl.arange(0, BR)).to(tl.int64)
                b0 = wc0
                a_cols = i * BR + tl.arange(0, BR)
            byte = tl.load(packed_ptr + base + wr[:, None] * ROW_BYTES + b0 + half[None, :]).to(tl.int32)
            scale = tl.load(absmax_ptr + (base + wr[:, None] * ROW_BYTES + b0) // BYTES_PER_ABSMAX + groups[None, :])
            hi = tl.reshape(tl.load(code_ptr + (byte >> 4)), (BR, BC // 64, 32)) * scale[:, :, None]
            lo = tl.reshape(tl.load(code_ptr + (byte & 15)), (BR, BC // 64, 32)) * scale[:, :, None]
            w = tl.interleave(tl.reshape(hi, (BR, BC // 2)), tl.reshape(lo, (BR, BC // 2))).to(a_ptr.dtype.element_ty)
            a = tl.load(a_ptr + rows[:, None] * stride_a + a_cols[None, :], mask=rmask[:, None], other=0.0)
            if TRANS:
                acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if TRANS:
            ocols = pid_n * BR + tl.arange(0, BR)
        else:
            ocols = pid_n * BC + tl.arange(0, BC)
        omask = rmask[:, None] & (ocols >= 0)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_out + ocols[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)

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

    Raises:
        ValueError: buffers of the wrong dtype, layout or size for ``shape``; ``dtype`` not a float type.
    """
    if triton is None:
        return None
    _check_nf4_buffers(packed, absmax, code)
    n = 1
    for d in shape:
        n *= d
    if packed.dim() != 1 or n != 2 * packed.numel() or absmax.numel() != packed.numel() // NF4_BYTES_PER_ABSMAX:
        raise ValueError(f"shape {tuple(shape)} ({n} weights) needs {n // 2} packed bytes and {n // 64} absmax values, "
                         f"got {tuple(packed.shape)} and {absmax.numel()}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    kernel = dequantize_kernel
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_bytes, block = packed.numel(), 2048
    kernel[(triton.cdiv(n_bytes, block),)](packed, absmax, code, out, n_bytes, BLOCK=block,
                                           BYTES_PER_ABSMAX=NF4_BYTES_PER_ABSMAX, num_warps=8)
    return out


def _check_nf4_buffers(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> None:
    """The kernels index these buffers as flat contiguous arrays of fixed dtypes: refuse anything else."""
    problems = []
    if packed.dtype != torch.uint8 or not packed.is_contiguous():
        problems.append(f"packed must be contiguous uint8 (got {packed.dtype}, contiguous={packed.is_contiguous()})")
    if absmax.dtype != torch.float32 or not absmax.is_contiguous():
        problems.append(f"absmax must be contiguous float32 (got {absmax.dtype}, contiguous={absmax.is_contiguous()})")
    if code.dtype != torch.float32 or code.shape != (16,) or not code.is_contiguous():
        problems.append(f"code must be the float32 NF4 table of 16 values (got {code.dtype} {tuple(code.shape)})")
    if len({packed.device, absmax.device, code.device}) > 1:
        problems.append(f"packed, absmax and code must be on one device (got {packed.device}, {absmax.device}, "
                        f"{code.device})")
    if problems:
        raise ValueError("; ".join(problems))


def _check_moe_inputs(a: torch.Tensor, counts, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                      w_rows: int, w_cols: int, name: str) -> None:
    """What both expert kernels index blindly: E NF4 matrices of (w_rows, w_cols) in ``packed``/``absmax``, the
    rows ``a`` (argument ``name``) on their device, and one integer row count per expert on that device."""
    num_experts = packed.shape[0]
    if packed.shape != (num_experts, w_rows * w_cols // 2) or absmax.shape != (num_experts, w_rows * w_cols // 64):
        raise ValueError(f"packed/absmax {tuple(packed.shape)}/{tuple(absmax.shape)} do not hold {num_experts} "
                         f"NF4 matrices of {w_rows}x{w_cols}")
    _check_nf4_buffers(packed, absmax, code)
    if a.device != packed.device:
        raise ValueError(f"{name} is on {a.device} but the NF4 weights are on {packed.device}")
    if not isinstance(counts, torch.Tensor) or counts.shape != (num_experts,) or counts.is_floating_point() \
            or counts.dtype == torch.bool or counts.device != a.device:
        shown = (f"{tuple(counts.shape)} {counts.dtype} on {counts.device}" if isinstance(counts, torch.Tensor)
                 else type(counts).__name__)
        raise ValueError(f"counts must be an integer tensor of shape ({num_experts},) on {a.device} (one row count "
                         f"per expert of packed), got {shown}")


def pick_blocks(k: int, n_cols: int, rows: int) -> tuple[int, int, int, int] | None:
    """Tile sizes (BM, BNB, BK, SPLIT_K) for :func:`nf4_moe_matmul`, or None when the shape does not tile (then
    use the dequantize path).

    BM: rows of one expert per program (the weight tile is dequantized once and used for BM rows; an expert with
    more rows gets more programs); BNB: packed bytes per weight row and tile (2 BNB output columns); BK: weight rows
    per step; SPLIT_K: programs that share one output tile's K range, summed with atomics, so that one token still
    spreads one expert's matrix over the whole GPU (about 512 programs per expert, each with at least 64 weight
    rows). Tiles divide K and the columns
    exactly (no masks on the weight loads). Defaults from the tile sweep of scripts/device/decode_gpu.py
    (docs/bench-generate.md)."""
    row_bytes = n_cols // 2
    if n_cols % 2:
        return None
    bm = 1 if rows <= 1 else 2  # 4 rows per program was 1.6x slower at 20 rows (registers)
    bnb = next((b for b in (256, 128, 64, 32, 16, 8) if row_bytes % b == 0), None)
    bk = next((b for b in (8, 4, 2, 1) if k % b == 0 and b * bm <= 8), None)
    if bnb is None or bk is None:
        return None
    steps = k // bk
    programs = 1024 if rows <= 1 else 512  # per expert; a lone row needs more of them in flight to hide latency
    target = max(1, min(programs // (row_bytes // bnb), k // 64))  # >= 64 weight rows per program: fewer atomics
    split = next(s for s in range(min(target, steps), 0, -1) if steps % s == 0)
    return bm, bnb, bk, split


def nf4_moe_matmul(x: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                   code: torch.Tensor, *, k: int, n_out: int, gated: bool,
                   blocks: tuple[int, int, int, int] | None = None, num_warps: int = 4,
                   num_stages: int | None = None, round_weights: bool = True) -> torch.Tensor | None:
    """Rows sorted by expert times each expert's NF4 matrix, dequantized inside the matmul.

    The kernel accumulates ``x @ W_e`` in float32 (atomics across K shares); PyTorch then rounds it to x's dtype
    and, for ``gated``, applies ``silu(g) * u`` in x's dtype, the same roundings as dequantize + ``torch._grouped_mm``
    + ``ACT2FN["silu"]`` (only the summation order differs).

    Args:
        x: (N, k) bf16/fp16/fp32, last dim contiguous; rows ``[sum(counts[:e]), sum(counts[:e+1]))`` belong to
            expert e.
        counts: (E,) integer tensor on x's device, one row count per expert. Not read on the host (that would be
            a sync): counts must be >= 0 and sum to at most N; otherwise the result is wrong, but the kernel still
            never reads or writes outside x, the weights and the output.
        packed: uint8 (E, k * w_cols / 2) contiguous, ``w_cols = 2 * n_out`` when ``gated`` else ``n_out``.
        absmax: float32 (E, k * w_cols / 64) contiguous.
        code: float32 (16,) NF4 table on x's device.
        k: inner dimension (rows of each expert's matrix).
        n_out: output columns (per half when ``gated``).
        gated: return ``silu(x @ W[:, :n_out]) * (x @ W[:, n_out:])`` instead of ``x @ W``.
        blocks: (BM, BNB, BK, SPLIT_K); default :func:`pick_blocks`.
        num_warps, num_stages: Triton launch options (defaults: 4 warps, Triton's stages).
        round_weights: round each dequantized weight to x's dtype before multiplying, as dequantize-then-matmul
            does (default; greedy tokens then match that path). False keeps them in fp32 (slightly more exact,
            a few instructions fewer).

    Returns:
        (N, n_out) in x's dtype (rows beyond ``sum(counts)`` are 0), or None when Triton is unavailable or the
        shape does not tile (the caller falls back to dequantize + matmul).

    Raises:
        ValueError: ``packed``/``absmax`` do not hold (E, k * w_cols) NF4 weights (shape, uint8/float32 dtype,
            contiguity), ``code`` is not float32 (16,), ``counts`` is not an (E,) integer tensor on x's device,
            ``x`` is not (N, k), or ``blocks`` do not tile the matrix.
    """
    if triton is None:
        return None
    num_experts = packed.shape[0]
    w_cols = 2 * n_out if gated else n_out
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be (N, {k}) with a contiguous last dim, got {tuple(x.shape)} {x.stride()}")
    _check_moe_inputs(x, counts, packed, absmax, code, k, w_cols, "x")
    blocks = blocks or pick_blocks(k, w_cols, x.shape[0])
    if blocks is None:
        return None
    bm, bnb, bk, split = blocks
    pow2 = all(b >= 1 and b & (b - 1) == 0 for b in (bm, bnb, bk))
    if not pow2 or split < 1 or k % (split * bk) or (w_cols // 2) % bnb:
        raise ValueError(f"blocks {blocks} do not tile a {k}x{w_cols} matrix: BM, BNB, BK must be powers of 2, "
                         f"SPLIT_K >= 1, K % (SPLIT_K * BK) == 0 and (columns / 2) % BNB == 0")
    acc = torch.zeros(x.shape[0], w_cols, dtype=torch.float32, device=x.device)  # rows of no expert stay 0
    if x.shape[0]:
        width = min(bnb, NF4_BYTES_PER_ABSMAX)
        grid = (triton.cdiv(x.shape[0], bm) + num_experts, w_cols // 2 // bnb, split)
        extra = {} if num_stages is None else {"num_stages": num_stages}
        # the matrix dimensions are compile-time constants: one build per projection shape (two per model), and
        # Triton's interpreter (numpy >= 2.4) cannot loop over a runtime-scalar range
        moe_gemv_kernel[grid](x, packed, absmax, code, counts, acc, x.shape[0], x.stride(0), acc.stride(0),
                              ROW_BYTES=w_cols // 2, EXPERT_BYTES=packed.shape[1], E=num_experts,
                              E_POW2=triton.next_power_of_2(num_experts), BM=bm, G=bnb // width, W=width, BK=bk,
                              K_SPLIT=k // split, SPLIT_K=split, ROUND=round_weights,
                              BYTES_PER_ABSMAX=NF4_BYTES_PER_ABSMAX, num_warps=num_warps, **extra)
    if not gated:
        return acc.to(x.dtype)
    g, u = acc.to(x.dtype).chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u



GEMM_BLOCKS = (64, 64, 128)  # (BM rows of one expert, BR weight rows, BC weight columns) per program and step


def nf4_moe_gemm(a: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                 code: torch.Tensor, *, w_rows: int, w_cols: int, transpose: bool = False,
                 blocks: tuple[int, int, int] | None = None, num_warps: int = 4,
                 num_stages: int | None = None) -> torch.Tensor | None:
    """Rows sorted by expert times each expert's NF4 matrix (or its transpose) on the matrix units, the weight
    tiles dequantized in registers: the training path's grouped GEMM without the bf16 copy of every expert.

    ``out = a_e @ W_e`` (``transpose=False``: forward) or ``out = a_e @ W_e^T`` (``transpose=True``: the input
    gradient), for the rows ``a_e`` of each expert e; W_e is expert e's (w_rows, w_cols) matrix as
    :func:`nf4_dequantize` rounds it, so the result equals dequantize + ``torch._grouped_mm`` up to fp32 summation
    order. The expert of each block of rows is found from ``counts`` in the kernel (no host sync); experts with
    no rows read nothing.

    Args:
        a: (N, w_rows) (or (N, w_cols) with ``transpose``) bf16/fp16 (fp32: exact products, for the CPU tests),
            last dim contiguous, rows sorted by expert.
        counts: (E,) integer tensor on a's device (rows per expert; >= 0, summing to at most N, not checked on the
            host: that would sync).
        packed: uint8 (E, w_rows * w_cols / 2) contiguous; absmax: float32 (E, w_rows * w_cols / 64) contiguous;
            code: float32 (16,) NF4 table.
        w_rows, w_cols: each expert's matrix shape (transformers' gate_up_proj (H, 2I), down_proj (I, H)).
        transpose: multiply by W_e^T.
        blocks: (BM, BR, BC) tile sizes, default ``GEMM_BLOCKS``; BR must divide w_rows, BC w_cols, BC % 64 == 0.

    Returns:
        (N, w_cols) (or (N, w_rows) with ``transpose``) in a's dtype, rows beyond ``sum(counts)`` 0; or None when
        Triton is unavailable or the shape does not tile (the caller falls back to dequantize + grouped GEMM).

    Raises:
        ValueError: buffers of the wrong shape, dtype or layout; ``a`` not (N, inner) with a contiguous last dim;
            ``counts`` not an (E,) integer tensor on a's device; ``blocks`` that do not tile the matrix.
    """
    if triton is None:
        return None
    num_experts = packed.shape[0]
    inner, outer = (w_cols, w_rows) if transpose else (w_rows, w_cols)
    if a.dim() != 2 or a.shape[1] != inner or a.stride(1) != 1 or a.dtype not in (torch.bfloat16, torch.float16,
                                                                                    torch.float32):
        raise ValueError(f"a must be (N, {inner}) bf16/fp16/fp32 with a contiguous last dim, got {tuple(a.shape)} "
                         f"{a.dtype} {a.stride()}")
    _check_moe_inputs(a, counts, packed, absmax, code, w_rows, w_cols, "a")
    bm, br, bc = blocks or GEMM_BLOCKS
    if w_rows % br or w_cols % bc:
        if blocks is not None:
            raise ValueError(f"blocks {blocks} do not tile a {w_rows}x{w_cols} matrix (BR | rows, BC | columns)")
        return None
    if any(b < 16 or b & (b - 1) for b in (bm, br, bc)) or bc % 64:
        raise ValueError(f"blocks {(bm, br, bc)}: BM, BR, BC must be powers of 2 >= 16 and BC a multiple of 64")
    out = torch.zeros(a.shape[0], outer, dtype=a.dtype, device=a.device)
    if a.shape[0]:
        grid = (triton.cdiv(a.shape[0], bm) + num_experts, outer // (br if transpose else bc))
        extra = {} if num_stages is None else {"num_stages": num_stages}
        moe_gemm_kernel[grid](a, packed, absmax, code, counts, out, a.shape[0], a.stride(0), out.stride(0),
                              ROW_BYTES=w_cols // 2, EXPERT_BYTES=packed.shape[1], E=num_experts,
                              E_POW2=triton.next_power_of_2(num_experts), TRANS=transpose,
                              BM=bm, BR=br, BC=bc, STEPS=w_cols // bc if transpose else w_rows // br,
                              BYTES_PER_ABSMAX=NF4_BYTES_PER_ABSMAX,
                              PRECISION="ieee" if a.dtype == torch.float32 else "tf32", num_warps=num_warps, **extra)
    return out
