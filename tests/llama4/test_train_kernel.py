"""The training path's NF4 grouped GEMM (:func:`medtune.llama4.kernels.nf4_moe_gemm`) in Triton's interpreter, fp32
(the interpreter gets bf16 ``tl.dot`` wrong: tests/llama4/test_decode.py): forward and transposed products equal
bitsandbytes' dequantize followed by a per-expert matmul, for any routing (idle experts, rows past the counts);
and the NF4 experts' forward and input gradient through it equal the dequantize + matmul path."""

from __future__ import annotations

import pytest
import torch

from medtune import llama4 as l4
from medtune.llama4 import kernels
from tests.llama4.test_decode import code, quantized


def reference(a, deq, counts, transpose):
    out, start = [], 0
    for e, n in enumerate(counts):
        w = deq[e].T if transpose else deq[e]
        out.append(a[start:start + n] @ w)
        start += n
    rest = a.shape[0] - start
    return torch.cat(out + [a.new_zeros(rest, out[0].shape[1])])


@pytest.mark.parametrize("counts,transpose", [([5, 0, 9], False), ([5, 0, 9], True), ([0, 40, 1], False),
                                              ([0, 40, 1], True), ([0, 0, 0], False)])
def test_moe_gemm_equals_dequantize_then_matmul(counts, transpose):
    packed, absmax, deq = quantized(3, 64, 128, seed=2)
    n = sum(counts) + 3  # rows past the counts stay 0
    a = torch.randn(n, 128 if transpose else 64, generator=torch.Generator().manual_seed(0))
    out = kernels.nf4_moe_gemm(a, torch.tensor(counts), packed, absmax, code(), w_rows=64, w_cols=128,
                               transpose=transpose, blocks=(16, 32, 64))
    ref = reference(a, deq, counts, transpose)
    assert out.shape == ref.shape == (n, 64 if transpose else 128)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out[sum(counts):].abs().sum() == 0


def test_moe_gemm_checks_its_inputs():
    packed, absmax, _ = quantized(2, 64, 128, seed=3)
    counts = torch.tensor([1, 1])
    a = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"a must be \(N, 128\)"):
        kernels.nf4_moe_gemm(a, counts, packed, absmax, code(), w_rows=64, w_cols=128, transpose=True)
    with pytest.raises(ValueError, match="do not hold 2 NF4 matrices of 64x256"):
        kernels.nf4_moe_gemm(a, counts, packed, absmax, code(), w_rows=64, w_cols=256)
    with pytest.raises(ValueError, match="counts must be an integer tensor.*float32"):
        kernels.nf4_moe_gemm(a, torch.tensor([1.0, 1.0]), packed, absmax, code(), w_rows=64, w_cols=128)
    with pytest.raises(ValueError, match="counts must be an integer tensor.*bool"):
        kernels.nf4_moe_gemm(a, torch.tensor([True, True]), packed, absmax, code(), w_rows=64, w_cols=128)
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        kernels.nf4_moe_gemm(a.double(), counts, packed, absmax, code(), w_rows=64, w_cols=128)
    with pytest.raises(ValueError, match="a is on meta but the NF4 weights are on cpu"):
        kernels.nf4_moe_gemm(a.to("meta"), counts, packed, absmax, code(), w_rows=64, w_cols=128)
    with pytest.raises(ValueError, match="do not tile"):
        kernels.nf4_moe_gemm(a, counts, packed, absmax, code(), w_rows=64, w_cols=128, blocks=(16, 48, 64))
    assert kernels.nf4_moe_gemm(a, counts, packed, absmax, code(), w_rows=64, w_cols=128,
                                blocks=None) is not None  # default tiles fall back to smaller ones? see below


def test_default_tiles_and_shapes_that_do_not_tile():
    packed, absmax, deq = quantized(2, 64, 128, seed=4)
    a = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    out = kernels.nf4_moe_gemm(a, torch.tensor([2, 3]), packed, absmax, code(), w_rows=64, w_cols=128)
    torch.testing.assert_close(out, reference(a, deq, [2, 3], False), rtol=1e-5, atol=1e-5)  # GEMM_BLOCKS
    p64, a64, _ = quantized(2, 64, 64, seed=4)  # 64 columns: no 128-wide tile, the caller dequantizes
    assert kernels.nf4_moe_gemm(a, torch.tensor([2, 3]), p64, a64, code(), w_rows=64, w_cols=64) is None


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_experts_training_through_the_gemm_equals_the_dequantize_path(monkeypatch, double_quant):
    from tests.llama4.test_llama4 import make_moe

    moe = make_moe(seed=7, hidden_size=128, intermediate_size=64, num_local_experts=4)  # both tile 128 columns
    l4.prepare_moe(moe, double_quant=double_quant, compute_dtype=torch.float32)
    x = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(2))
    calls = []
    gemm = kernels.nf4_moe_gemm
    monkeypatch.setattr(kernels, "nf4_moe_gemm", lambda *a, **k: calls.append(k["transpose"]) or gemm(*a, **k))

    def run(mode):
        monkeypatch.setattr(l4.Llama4NF4Experts, "fused_gemm", mode)
        xi = x.clone().requires_grad_(True)
        out, _ = moe(xi)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        (grad,) = torch.autograd.grad((out * w).sum(), xi)
        return out.detach(), grad

    ref_out, ref_grad = run("off")
    assert calls == []
    out, grad = run("always")
    assert calls == [False, False, True, False, True]  # forward: gate_up, down; backward: down^T, gate_up, gate_up^T
    # fp32 with a different summation order (tiles of 64 rows vs one matmul): ~4e-6 absolute measured
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    assert ref_grad.abs().max() > 0.1  # the gradient is not trivially small
