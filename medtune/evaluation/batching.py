"""How many sequences go into one forward pass or one generation batch: as many as the free GPU memory holds.

Scoring and answering at a fixed small batch leaves an H200 mostly idle (log-likelihood at batch 2 ran at 9.6
items/s, at batch 32 at 44: docs/bench-h200.md). The estimate below is deliberately coarse and conservative: it
counts the tensors that grow with the number of tokens in a no-grad forward of a decoder-only model, plus the one
transient buffer that does not (a whole projection of NF4 routed experts, dequantized, on the training path).
"""

from __future__ import annotations

import math

import torch

from medtune.llama4 import Llama4NF4Experts
from medtune.llama4.decode import kv_cache_bytes

__all__ = ["ACTIVATION_SHARE", "LOGIT_BYTES", "auto_batch_size", "bytes_per_token"]

ACTIVATION_SHARE = 0.6  # of the free memory; the rest absorbs allocator fragmentation and the estimate's error
LOGIT_BYTES = 2 + 4 + 4  # per vocabulary entry and kept position: bf16 logits, .float() copy, log-softmax


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def bytes_per_token(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes that one more token costs in a no-grad forward (or one more position of a generation batch).

    Residual stream, norms, q/k/v/o and attention output (about 8 hidden-size vectors), the MLP's gate/up output
    and product (3 intermediate-size vectors, the larger of the MoE expert and dense MLP sizes), and the KV cache
    (:func:`medtune.llama4.decode.kv_cache_bytes`).
    """
    cfg = _text_config(model)
    inter = max(getattr(cfg, "intermediate_size", 0) or 0, getattr(cfg, "intermediate_size_mlp", 0) or 0)
    return dtype.itemsize * (8 * cfg.hidden_size + 3 * inter) + kv_cache_bytes(model, 1, dtype)


def _fixed_bytes(model) -> int:
    """The largest transient buffer that does not grow with tokens: one projection of all NF4 routed experts of a
    layer dequantized to bf16 (Scout: 16 x 5120 x 16384 x 2 B = 2.5 GiB), as the many-token path makes it."""
    sizes = [e.num_experts * e.hidden_size * 2 * e.intermediate_size * 2
             for e in model.modules() if isinstance(e, Llama4NF4Experts)]
    return max(sizes, default=0)


def auto_batch_size(model, seq_len: int, *, free_bytes: int | None = None, limit: int = 64,
                    share: float = ACTIVATION_SHARE, full_logits: bool = False) -> int:
    """Sequences of ``seq_len`` tokens per batch that fit ``share`` of the free GPU memory.

    Args:
        model: the (4-bit, PEFT or not) causal LM, already on its device.
        seq_len: tokens per sequence (prompt + new tokens for generation; the longest item for scoring).
        free_bytes: free device memory in bytes; default ``torch.cuda.mem_get_info()`` of the model's device.
        limit: the most sequences per batch (also the answer when the memory would allow more).
        share: fraction of the free memory to plan for.
        full_logits: the caller keeps logits for every position (held-out loss): add ``LOGIT_BYTES`` bytes per
            vocabulary entry and token (bf16 logits, their float32 copy, float32 log-softmax). Scoring and
            generation keep a few positions (``logits_to_keep``) and leave it False.

    Returns:
        An int in [1, ``limit``].

    Raises:
        ValueError: ``seq_len`` or ``limit`` not a whole number >= 1; ``free_bytes`` negative or not finite; no
            ``free_bytes`` given and the model is not on a GPU.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1 \
            or isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"seq_len and limit must be whole numbers >= 1, got {seq_len!r} and {limit!r}")
    if free_bytes is None:
        device = next(p for p in model.parameters()).device
        if device.type != "cuda":
            raise ValueError("auto_batch_size: the model is not on a GPU; pass free_bytes or a fixed batch size")
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if not math.isfinite(free_bytes) or free_bytes < 0:
        raise ValueError(f"free_bytes must be a finite number of bytes >= 0, got {free_bytes!r}")
    per_token = bytes_per_token(model)
    if full_logits:
        per_token += LOGIT_BYTES * _text_config(model).vocab_size
    budget = free_bytes * share - _fixed_bytes(model)
    fit = int(budget // (seq_len * per_token))
    return max(1, min(limit, fit))
