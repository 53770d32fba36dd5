"""The decode path on the CPU: the fused NF4 expert kernel (Triton's interpreter, fp32) against bitsandbytes'
dequantize followed by a matmul, and greedy decoding with a static cache against transformers' ``generate`` on a
tiny Llama 4 whose routed experts are the same NF4 weights dequantized (transformers' dense ``Llama4TextMoe`` math).

``TRITON_INTERPRET=1`` is set by tests/conftest.py before Triton is imported. The interpreter (Triton 3.6, numpy 2.4)
gets bf16 ``tl.dot`` wrong and rounds fp32 -> bf16 toward zero, so the CPU checks run in fp32 (exact arithmetic
there: ``input_precision="ieee"``); bf16 is checked on the GPU (scripts/device/decode_gpu.py).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers.models.llama4.modeling_llama4 import Llama4TextExperts, Llama4TextMoe

from medtune import llama4 as l4
from medtune.llama4 import decode, kernels


def tiny_text(**overrides):
    dims = dict(vocab_size=512, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1)
    return l4.scout_text_config(**{**dims, **overrides})


def test_interpreter_is_on():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert kernels.available(), "triton is a test dependency (pyproject [dev]); the kernels' numerics run on the CPU"


def quantized(num_experts, k, n, seed):
    """(packed (E, k*n/2) uint8, absmax (E, k*n/64) fp32, dequantized (E, k, n) fp32) from bitsandbytes.

    ``n`` is a multiple of 64 as in every Llama 4 shape: bitsandbytes 0.50.2's native CPU dequantize disagrees with
    its own generic one when a 64-weight block straddles two rows (seen with n = 96)."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(seed)
    w = torch.randn(num_experts, k, n) * 0.2
    packed, absmax, deq = [], [], []
    for e in range(num_experts):
        q, st = bnbf.quantize_4bit(w[e], blocksize=64, quant_type="nf4")
        packed.append(q.reshape(-1))
        absmax.append(st.absmax.reshape(-1))
        deq.append(bnbf.dequantize_4bit(q, quant_state=st))
    return torch.stack(packed), torch.stack(absmax), torch.stack(deq)


def code():
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu")


def test_dequantize_kernel_matches_bitsandbytes_exactly():
    packed, absmax, deq = quantized(3, 64, 128, seed=1)
    out = kernels.nf4_dequantize(packed.reshape(-1), absmax.reshape(-1), code(), (3, 64, 128), torch.float32)
    assert torch.equal(out, deq)


@pytest.mark.parametrize("counts", [[1, 0, 0, 0], [0, 3, 0, 2], [5, 17, 0, 1], [0, 0, 0, 0], [33, 1, 1, 1],
                                    [0, 0, 0, 7]])
@pytest.mark.parametrize("gated", [False, True])
# default tiles; 16 rows per program with K split over 4 programs (atomics); one row, groups of 32 bytes; 4 rows,
# groups of 8 bytes (narrower than an absmax block), one K program
@pytest.mark.parametrize("blocks", [None, (16, 16, 16, 4), (1, 32, 4, 2), (4, 8, 2, 1)])
def test_moe_matmul_matches_dequantize_then_matmul(counts, gated, blocks):
    k, n = 64, 64
    packed, absmax, w = quantized(4, k, 2 * n if gated else n, seed=sum(counts) + gated)
    x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(7))
    out = kernels.nf4_moe_matmul(x, torch.tensor(counts), packed, absmax, code(), k=k, n_out=n, gated=gated,
                                 blocks=blocks)
    ref, start = [], 0
    for e, c in enumerate(counts):
        y = x[start:start + c] @ w[e]
        if gated:
            g, u = y.chunk(2, dim=-1)
            y = torch.nn.functional.silu(g) * u
        ref.append(y)
        start += c
    ref = torch.cat(ref)
    assert out.shape == (sum(counts), n)
    if ref.numel():
        assert ((out - ref).norm() / ref.norm()).item() < 1e-6  # fp32, same products, another summation order


def test_moe_matmul_rejects_wrong_shapes():
    packed, absmax, _ = quantized(2, 64, 64, seed=3)
    with pytest.raises(ValueError, match="x must be"):
        kernels.nf4_moe_matmul(torch.randn(3, 32), torch.tensor([1, 2]), packed, absmax, code(), k=64, n_out=64,
                               gated=False)
    with pytest.raises(ValueError, match="do not tile a 64x64 matrix"):  # K 64 is no multiple of 4 x 64
        kernels.nf4_moe_matmul(torch.randn(3, 64), torch.tensor([1, 2]), packed, absmax, code(), k=64, n_out=64,
                               gated=False, blocks=(16, 16, 64, 4))
    with pytest.raises(ValueError, match="do not hold 2 NF4 matrices of 64x128"):
        kernels.nf4_moe_matmul(torch.randn(3, 64), torch.tensor([1, 2]), packed, absmax, code(), k=64, n_out=64,
                               gated=True)


def test_moe_matmul_tiles_odd_k_and_declines_narrow_rows():
    packed, absmax, w = quantized(2, 40, 64, seed=4)  # K = 40: tiles of 8 weight rows
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(5))
    out = kernels.nf4_moe_matmul(x, torch.tensor([1, 1]), packed, absmax, code(), k=40, n_out=64, gated=False)
    ref = torch.cat([x[:1] @ w[0], x[1:] @ w[1]])
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6
    packed, absmax, _ = quantized(2, 64, 4, seed=6)  # 2 packed bytes per weight row: no tile of 8 bytes fits
    assert kernels.nf4_moe_matmul(torch.randn(2, 64), torch.tensor([1, 1]), packed, absmax, code(), k=64, n_out=4,
                                  gated=False) is None


def tiny_nf4_model(seed=0):
    """A 2-layer tiny Llama 4 (fp32) with NF4 routed experts and sparse dispatch, and its reference: the same model
    with transformers' dense ``Llama4TextMoe`` over the NF4 experts dequantized (fp32 parameters)."""
    from transformers import Llama4ForCausalLM

    torch.manual_seed(seed)
    config = tiny_text(vocab_size=256, num_local_experts=4, attn_implementation="sdpa")
    model = Llama4ForCausalLM(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    reference = copy.deepcopy(model)
    l4.prepare_llama4_for_qlora(model, compute_dtype=torch.float32)
    for layer, ref_layer in zip(model.model.layers, reference.model.layers, strict=True):
        experts = layer.feed_forward.experts
        assert isinstance(experts, l4.Llama4NF4Experts)
        gate_up, down = experts.dequantized_weights()
        assert isinstance(ref_layer.feed_forward, Llama4TextMoe)
        ref_experts: Llama4TextExperts = ref_layer.feed_forward.experts
        with torch.no_grad():
            ref_experts.gate_up_proj.copy_(gate_up)
            ref_experts.down_proj.copy_(down)
    return model, reference


def test_fused_experts_used_and_equal_in_model_forward(monkeypatch):
    model, reference = tiny_nf4_model(seed=1)
    calls = []
    original = kernels.nf4_moe_matmul
    monkeypatch.setattr(kernels, "nf4_moe_matmul", lambda *a, **kw: calls.append(kw["gated"]) or original(*a, **kw))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        l4.Llama4NF4Experts.fused = "always"
        try:
            fused = model(input_ids=ids).logits
        finally:
            l4.Llama4NF4Experts.fused = "auto"
        ref = reference(input_ids=ids).logits
    assert calls == [True, False, True, False]  # both layers, both projections through the kernel
    assert ((fused - ref).norm() / ref.norm()).item() < 1e-5


def test_greedy_decode_matches_generate_on_the_reference_model(monkeypatch):
    """Greedy tokens of the new path (NF4 experts through the fused kernel, static cache, left padding) equal
    transformers' ``generate`` on the reference model for 64 new tokens, token for token."""
    model, reference = tiny_nf4_model(seed=3)
    monkeypatch.setattr(l4.Llama4NF4Experts, "fused", "always")
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 256, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding of different lengths
    ids[2, :1], mask[2, :1] = 0, 0
    new = decode.greedy_decode(model, ids, mask, max_new_tokens=64, eos_token_ids=[255], pad_token_id=0)
    want = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                              eos_token_id=255, pad_token_id=0)[:, ids.shape[1]:]
    assert new.shape == (3, 64)
    assert torch.equal(new, want)


def test_greedy_decode_stops_at_eos_and_pads():
    model, _ = tiny_nf4_model(seed=5)
    ids = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    free = decode.greedy_decode(model, ids, mask, max_new_tokens=12, eos_token_ids=[255], pad_token_id=0)
    eos = int(free[0, 3])  # make the 4th token of sequence 0 its EOS
    new = decode.greedy_decode(model, ids, mask, max_new_tokens=12, eos_token_ids=[eos], pad_token_id=0)
    row = new[0].tolist()
    stop = row.index(eos)
    assert stop <= 3 and all(t == 0 for t in row[stop + 1:])
    assert torch.equal(new[0, :stop + 1], free[0, :stop + 1])


def test_greedy_decode_refuses_bad_arguments():
    model, _ = tiny_nf4_model(seed=7)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens and check_every must be >= 1, got 0"):
        decode.greedy_decode(model, ids, torch.ones_like(ids), max_new_tokens=0, eos_token_ids=[1], pad_token_id=0)
    with pytest.raises(ValueError, match="must both be"):
        decode.greedy_decode(model, ids, torch.ones(1, 3), max_new_tokens=2, eos_token_ids=[1], pad_token_id=0)
    with pytest.raises(ValueError, match="exceed the attention chunk"):
        decode.greedy_decode(model, ids, torch.ones_like(ids), max_new_tokens=model.config.attention_chunk_size,
                             eos_token_ids=[1], pad_token_id=0)


def test_kv_cache_bytes_scout():
    from transformers import Llama4ForCausalLM

    with torch.device("meta"):
        model = Llama4ForCausalLM(l4.scout_text_config(num_hidden_layers=48))
    assert decode.kv_cache_bytes(model, 1) == 2 * 48 * 8 * 128 * 2 == 196_608


def test_greedy_decode_on_the_multimodal_class_matches_generate():
    """04/06 load Scout as ``Llama4ForConditionalGeneration``: the static-cache path works through its forward (the
    mask mapping passes to the language model) and gives ``generate``'s greedy tokens, with a PEFT LoRA adapter
    (unmerged, B != 0) on the attention and shared-expert projections as 06 runs it."""
    from peft import LoraConfig, get_peft_model
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(8)
    text = tiny_text(vocab_size=256, intermediate_size=64)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                  vision_output_dim=64, image_size=56, patch_size=14, projector_input_dim=64, projector_output_dim=64)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=text.to_dict(), vision_config=vision)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    l4.prepare_llama4_for_qlora(model, compute_dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    model = get_peft_model(model, lora).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    new = decode.greedy_decode(model, ids, mask, max_new_tokens=24, eos_token_ids=[255], pad_token_id=0)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=255,
                          pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(new, want)


def test_kernel_inputs_are_checked_before_launch():
    """Wrong dtypes, layouts and counts are refused with the reason (the kernel indexes flat buffers)."""
    packed, absmax, _ = quantized(4, 64, 64, seed=11)
    x = torch.randn(8, 64)
    counts = torch.tensor([2, 2, 2, 2])

    def run(**kw):
        args = dict(x=x, counts=counts, packed=packed, absmax=absmax, code=code())
        args.update(kw)
        return kernels.nf4_moe_matmul(args["x"], args["counts"], args["packed"], args["absmax"], args["code"], k=64,
                                      n_out=64, gated=False, blocks=kw.get("blocks"))

    for kw, message in [
        (dict(counts=torch.tensor([4, 4])), r"counts must be an integer tensor of shape \(4,\)"),
        (dict(counts=[2, 2, 2, 2]), "counts must be an integer tensor"),
        (dict(counts=torch.tensor([2.0, 2, 2, 2])), "counts must be an integer tensor"),
        (dict(packed=packed.view(torch.int8)), "packed must be contiguous uint8"),
        (dict(absmax=absmax.double()), "absmax must be contiguous float32"),
        (dict(code=code()[:8]), "code must be the float32 NF4 table"),
        (dict(blocks=(24, 16, 16, 1)), "powers of 2"),
        (dict(blocks=(16, 16, 16, 0)), "SPLIT_K >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(**kw)


def test_kernel_stays_inside_its_buffers_when_counts_are_wrong():
    """Counts summing past the rows (or negative) cannot be checked without a host sync; the kernel masks rows
    beyond x and clamps negative counts, so the result is wrong but nothing outside x and the output is touched."""
    packed, absmax, w = quantized(4, 64, 64, seed=12)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(13))
    out = kernels.nf4_moe_matmul(x, torch.tensor([10, 10, 10, 10]), packed, absmax, code(), k=64, n_out=64,
                                 gated=False)
    assert out.shape == (8, 64) and torch.allclose(out, x @ w[0], rtol=1e-5, atol=1e-5)  # all 8 rows on expert 0
    out = kernels.nf4_moe_matmul(x, torch.tensor([-2, 5, 2, 3]), packed, absmax, code(), k=64, n_out=64, gated=False)
    assert out.shape == (8, 64) and torch.isfinite(out).all()


def test_dequantize_checks_the_output_size():
    packed, absmax, _ = quantized(4, 64, 64, seed=14)
    with pytest.raises(ValueError, match="needs 4096 packed bytes"):
        kernels.nf4_dequantize(packed.reshape(-1), absmax.reshape(-1), code(), (4, 64, 32), torch.float32)
    with pytest.raises(ValueError, match="dtype must be"):
        kernels.nf4_dequantize(packed.reshape(-1), absmax.reshape(-1), code(), (4, 64, 64), torch.int32)


def test_greedy_decode_refuses_right_padding_other_models_and_no_pad():
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = tiny_nf4_model(seed=15)
    ids = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(16))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    with pytest.raises(ValueError, match="right-padded.*padding_side = 'left'"):
        decode.greedy_decode(model, ids, mask, max_new_tokens=4, eos_token_ids=[1], pad_token_id=0)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        decode.greedy_decode(model, ids, torch.ones_like(ids), max_new_tokens=4, eos_token_ids=1, pad_token_id=None)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError, match="serves Llama 4 models; LlamaForCausalLM is not one"):
        decode.greedy_decode(llama, ids, torch.ones_like(ids), max_new_tokens=4, eos_token_ids=[1], pad_token_id=0)


def test_greedy_decode_names_an_empty_row_and_takes_an_eos_id_of_any_integer_kind():
    """A row that is all padding was reported as a right-padded batch; eos_token_ids=None (a tokenizer without an
    EOS) and a NumPy or 0-d tensor id failed with "object is not iterable"; check_every=NaN was taken and never
    checked for stopped sequences."""
    import numpy as np

    model, _ = tiny_nf4_model(seed=5)
    ids = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=12, pad_token_id=0)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] of attention_mask are all padding \(an empty prompt\)"):
        decode.greedy_decode(model, ids, empty, eos_token_ids=[1], **kw)
    with pytest.raises(ValueError, match="eos_token_ids is None: give the tokenizer's eos_token_id, or \\[\\]"):
        decode.greedy_decode(model, ids, mask, eos_token_ids=None, **kw)
    with pytest.raises(ValueError, match="check_every must be >= 1, got 12 and nan"):
        decode.greedy_decode(model, ids, mask, eos_token_ids=[1], check_every=float("nan"), **kw)
    free = decode.greedy_decode(model, ids, mask, eos_token_ids=[], **kw)
    eos = int(free[0, 3])
    want = decode.greedy_decode(model, ids, mask, eos_token_ids=[eos], **kw)
    assert int((want == 0).sum()) > 0  # the EOS stopped a sequence
    for kind in (eos, np.int64(eos), torch.tensor(eos), [torch.tensor(eos)], (eos, eos, -1)):
        assert torch.equal(decode.greedy_decode(model, ids, mask, eos_token_ids=kind, **kw), want), kind


def test_a_kernel_that_fails_to_build_falls_back_to_the_library_path(monkeypatch, caplog):
    """A Triton build or launch failure (an untested GPU or driver) must not end the run: the experts take the
    dequantize path, with one warning, and the kernel is not tried again in the process; a wrong argument (a bug in
    the caller) still raises."""
    model, reference = tiny_nf4_model(seed=6)
    monkeypatch.setattr(l4.Llama4NF4Experts, "fused", "always")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("triton: out of resources: shared memory")

    monkeypatch.setattr(kernels, "nf4_moe_matmul", broken)
    kernels.reset_failures()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(8))
    try:
        with torch.no_grad():
            got = model(input_ids=ids).logits
            again = model(input_ids=ids).logits
            want = reference(input_ids=ids).logits
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4) and torch.equal(got, again)
        assert len(calls) == 1  # tried once, then skipped
        assert "out of resources" in kernels.failed()["nf4_moe_matmul"]
        assert "Triton kernel nf4_moe_matmul failed" in caplog.text
    finally:
        kernels.reset_failures()
    with pytest.raises(ValueError, match="bad argument"):
        kernels.guarded("x", lambda: (_ for _ in ()).throw(ValueError("bad argument")))
    assert kernels.failed() == {}


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_step_gives_the_same_tokens_and_compiles_once_per_shape():
    """``compile=True`` (the CUDA default) gives the uncompiled step's tokens. The number of graphs TorchDynamo
    builds does not grow with the tokens decoded: transformers' sliding-window static layer counts its length in a
    Python int, which a compiled step guards on (a recompile per token); greedy_decode's own static layers do not.
    On the reference model (transformers' dense MoE): the NF4 experts' CPU path reads the routing on the host, so
    its graphs depend on which experts the tokens pick."""
    import torch._dynamo

    _, model = tiny_nf4_model(seed=3)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 256, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    built = []
    for new in (6, 14):
        torch._dynamo.reset()
        before = _unique_graphs()
        got = decode.greedy_decode(model, ids, mask, max_new_tokens=new, eos_token_ids=[255], pad_token_id=0,
                                   compile=True)
        built.append(_unique_graphs() - before)
        want = decode.greedy_decode(model, ids, mask, max_new_tokens=new, eos_token_ids=[255], pad_token_id=0,
                                    compile=False)
        assert torch.equal(got, want)
    assert decode.compile_failed() is None
    assert built[0] == built[1] > 0, built


def test_a_step_that_fails_to_compile_decodes_uncompiled(monkeypatch, caplog):
    """A compiler failure (an untested torch or GPU) must not end the run: the tokens are those of the uncompiled
    step, one warning says why, and later calls do not try again in this process."""
    model, _ = tiny_nf4_model(seed=5)
    ids = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    want = decode.greedy_decode(model, ids, mask, max_new_tokens=9, eos_token_ids=[255], pad_token_id=0)
    tries = []

    def broken_compile(fn, **kwargs):
        def run():
            tries.append(1)
            fn()  # moves the counters part-way, as a failure after some work would
            raise RuntimeError("InductorError: a compiler error")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(decode, "_COMPILE_FAILED", [])
    got = decode.greedy_decode(model, ids, mask, max_new_tokens=9, eos_token_ids=[255], pad_token_id=0, compile=True)
    assert torch.equal(got, want)
    assert "a compiler error" in decode.compile_failed()
    assert "torch.compile of the decode step failed" in caplog.text
    assert tries == [1]


def test_progress_is_reported_in_tokens_per_sequence():
    """``on_tokens`` (the notebooks' live tokens/s) gets the new tokens per sequence so far, every ``check_every``
    steps and at the end: 10 tokens with checks every 4 steps -> 5, 9, 10."""
    model, _ = tiny_nf4_model(seed=8)
    ids = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(9))
    seen = []
    decode.greedy_decode(model, ids, torch.ones_like(ids), max_new_tokens=10, eos_token_ids=[], pad_token_id=0,
                         check_every=4, on_tokens=seen.append)
    assert seen == [5, 9, 10]


def test_the_compile_switch_reads_like_a_switch(caplog):
    """MEDTUNE_DECODE_COMPILE=true (or yes, on, " 1") left the step uncompiled without a word: only "1" counted."""
    for on in ("1", " 1 ", "true", "True", "yes", "on"):
        assert decode._compile_default(on) is True, on
    for off in (None, "", "0", "false", "no", "off"):
        assert decode._compile_default(off) is False, off
    assert not caplog.text
    assert decode._compile_default("compile") is False
    assert "MEDTUNE_DECODE_COMPILE='compile' is not 1 or 0: the decode step stays uncompiled" in caplog.text
