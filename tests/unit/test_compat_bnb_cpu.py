"""The bitsandbytes CPU repacking workaround (medtune/compat.py): a 4-bit Linear evaluated without gradients and then
trained must compute what a fresh one computes."""

from __future__ import annotations

import torch

from medtune.compat import keep_cpu_4bit_weights_unpacked


def linear4bit():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    weight = torch.randn(64, 128) * 0.1
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def eval_then_train(layer, x):
    layer.eval()
    with torch.no_grad():
        evaluated = layer(x)
    layer.train()
    return evaluated, layer(x.clone().requires_grad_(True))


def test_eval_then_train_equals_a_fresh_layer_with_the_workaround():
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    fresh = linear4bit().train()(x.clone().requires_grad_(True))
    layer = linear4bit()
    keep_cpu_4bit_weights_unpacked(layer)
    evaluated, trained = eval_then_train(layer, x)
    assert torch.equal(trained, fresh) and torch.equal(evaluated, fresh.detach())
    assert keep_cpu_4bit_weights_unpacked(layer) == 0  # idempotent


def test_without_the_workaround_bitsandbytes_repacks_on_avx512_bf16_cpus():
    """Shows the bug where it exists (CPUs with AVX512-BF16, as CI's and this project's machines have had); fails
    once bitsandbytes packs the weight back or stops repacking it in place: then drop the workaround."""
    from bitsandbytes.functional import has_avx512bf16

    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    fresh = linear4bit().train()(x.clone().requires_grad_(True))
    layer = linear4bit()
    if not has_avx512bf16():  # the repacking is never switched on here; the workaround changes nothing
        assert keep_cpu_4bit_weights_unpacked(layer) == 0
        return
    _, trained = eval_then_train(layer, x)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert not torch.equal(trained, fresh)
