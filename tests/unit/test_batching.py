"""Batch sizes from free GPU memory (medtune.evaluation.batching), against hand-computed figures."""

from __future__ import annotations

import pytest
import torch

from medtune.evaluation import batching
from medtune.evaluation.heldout import resolve_batch_size


def scout_meta(layers=48):
    from transformers import Llama4ForCausalLM

    from medtune.llama4 import scout_text_config

    with torch.device("meta"):
        return Llama4ForCausalLM(scout_text_config(num_hidden_layers=layers))


def test_bytes_per_token_scout_by_hand():
    # bf16: 8 x 5120 hidden + 3 x 16384 (the larger MLP size) = 90,112 values -> 180,224 B; KV 2 x 48 x 8 x 128 x 2 B
    assert batching.bytes_per_token(scout_meta()) == 180_224 + 196_608


def test_auto_batch_size_by_hand():
    model = scout_meta(2)  # plain bf16 experts: no NF4 buffer to reserve
    per_token = 180_224 + 2 * 8 * 128 * 2 * 2
    free = 10 * 2**30
    assert batching.auto_batch_size(model, 300, free_bytes=free, limit=10_000) == int(free * 0.6 // (300 * per_token))
    with_logits = per_token + 10 * 202_048
    assert batching.auto_batch_size(model, 300, free_bytes=free, limit=10_000, full_logits=True) == \
        int(free * 0.6 // (300 * with_logits))
    assert batching.auto_batch_size(model, 300, free_bytes=free, limit=7) == 7
    assert batching.auto_batch_size(model, 300, free_bytes=0) == 1


@pytest.mark.parametrize("kw", [dict(seq_len=0), dict(seq_len=2.5), dict(limit=0), dict(free_bytes=float("nan")),
                                dict(free_bytes=-1)])
def test_auto_batch_size_refuses_bad_values(kw):
    args = dict(seq_len=300, free_bytes=2**30, limit=8)
    args.update(kw)
    with pytest.raises(ValueError):
        batching.auto_batch_size(scout_meta(1), args.pop("seq_len"), **args)


def test_resolve_batch_size():
    model = torch.nn.Linear(2, 2)  # on the CPU: "auto" is the CPU batch
    assert resolve_batch_size(3, model, 100, 10) == 3
    assert resolve_batch_size("auto", model, 100, 10) == 4
    assert resolve_batch_size("auto", model, 100, 2) == 2
    for bad in (0, -3, 2.5, "Auto", True):
        with pytest.raises(ValueError, match="whole number >= 1 or 'auto'"):
            resolve_batch_size(bad, model, 100, 10)
