"""Batched greedy decoding of Llama 4 with a static KV cache and one CUDA graph per decode step.

Why: decoding Scout token by token through ``model.generate`` is bound by the host, not the GPU: each of the 48
layers launches dozens of small kernels from Python (bitsandbytes' 4-bit Linears, LoRA, routing, the experts), so
the CPU spends several milliseconds per layer per token while the GPU idles (docs/bench-h200.md). Here the prompt
is run once (prefill, eager), then one decode step (model forward for one token per sequence, argmax, EOS
bookkeeping, cache and position updates) is captured once in a ``torch.cuda.CUDAGraph`` and replayed: the host
issues one launch per token. Nothing in the step reads a device value on the host; the loop checks every
``check_every`` steps whether all sequences have stopped.

The cache is transformers' ``StaticCache`` (device-side lengths, written in place: made for CUDA graphs). The 4-D
attention masks are built here from a device-side position, for both of Llama 4's layer kinds (full attention,
and chunked attention with ``attention_chunk_size``), and passed as the ``{layer type: mask}`` mapping that
``Llama4TextModel.forward`` accepts in place of a 2-D mask. Sequences are left-padded; positions count real tokens
only, as ``generate`` does, so greedy tokens match ``generate``'s up to floating-point summation order.

Inside the graph the step is still dozens of small kernels per layer (norms, rotary, routing, casts). ``compile=True``
compiles the step with ``torch.compile`` before capturing it (TorchInductor fuses that elementwise work; the
bitsandbytes and Triton kernels stay as they are). It is off by default: on the 48-layer Scout-shaped model it made a
batch-1 step 1.35x faster but took 90-115 s to build per batch shape and cache length, and gave nothing at batch 20
(docs/bench-generate.md), so it pays only for batch-1 decoding of many thousands of tokens in one process
(``MEDTUNE_DECODE_COMPILE=1`` turns it on by default). If compiling fails on an untested torch, GPU or model, the step
runs uncompiled, with one warning per process (:func:`compile_failed` says why).

On the CPU (or ``cuda_graph=False``) the same loop runs eagerly; the tests compare it with ``generate``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

from medtune import families

logger = logging.getLogger(__name__)

__all__ = ["KV_BYTES_PER_TOKEN_FACTOR", "compile_failed", "fits_static_cache", "greedy_decode", "kv_cache_bytes"]

KV_BYTES_PER_TOKEN_FACTOR = 2  # keys and values


def _compile_default(raw: str | None) -> bool:
    """``$MEDTUNE_DECODE_COMPILE`` as a switch: 1/true/yes/on, or 0/false/no/off/unset; anything else is off with a
    warning (``true`` used to be off silently: only ``1`` counted)."""
    value = (raw or "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        logger.warning("MEDTUNE_DECODE_COMPILE=%r is not 1 or 0: the decode step stays uncompiled", raw)
    return False


# default of greedy_decode's ``compile`` on CUDA (module doc: off, it rarely repays its build time)
COMPILE_DEFAULT = _compile_default(os.environ.get("MEDTUNE_DECODE_COMPILE"))
_COMPILE_FAILED: list[str] = []  # the error that turned compiling off for this process


def compile_failed() -> str | None:
    """The error that made :func:`greedy_decode` stop compiling its step in this process, or None."""
    return _COMPILE_FAILED[0] if _COMPILE_FAILED else None


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_cache_bytes(model, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a static KV cache holding ``tokens`` positions (all sequences together) for ``model``.

    2 (K and V) x layers x KV heads x head dim x element size per position; Scout: 2 x 48 x 8 x 128 x 2 B
    = 196,608 B (192 KiB) per token.
    """
    cfg = _text_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    per_token = KV_BYTES_PER_TOKEN_FACTOR * cfg.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    return tokens * per_token


def fits_static_cache(model, total_len: int) -> bool:
    """True when a static cache of ``total_len`` positions behaves like a plain growing cache: within Llama 4's
    attention chunk (``StaticSlidingWindowLayer`` rolls past it, which a captured graph cannot follow)."""
    chunk = getattr(_text_config(model), "attention_chunk_size", None)
    return chunk is None or total_len <= chunk


def _accepts_mask_mapping(model) -> bool:
    """Llama 4 (bare or PEFT-wrapped): its text model takes the ``{layer type: 4-D mask}`` mapping built here."""
    return hasattr(model, "config") and families.is_llama4(model)


def _masks(kv_valid: torch.Tensor, q_pos: torch.Tensor, chunk: int | None) -> dict[str, torch.Tensor]:
    """Boolean attention masks (B, 1, Q, L), True = attend, for query cache positions ``q_pos`` (Q,) over the
    cache's L slots: causal, real keys only (``kv_valid`` (B, L)); the chunked kind also keeps keys in the query's
    chunk. A padded query row keeps its own slot so that no row is fully masked (SDPA would give NaN)."""
    slots = torch.arange(kv_valid.shape[1], device=kv_valid.device)
    causal = slots[None, :] <= q_pos[:, None]  # (Q, L)
    full = causal[None] & kv_valid[:, None, :]  # (B, Q, L)
    full = full | (slots[None, None, :] == q_pos[None, :, None])
    masks = {"full_attention": full[:, None]}
    if chunk is not None:
        same_chunk = (slots[None, :] // chunk) == (q_pos[:, None] // chunk)
        masks["chunked_attention"] = (full & same_chunk[None])[:, None]
    return masks


@torch.no_grad()
def greedy_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    cuda_graph: bool = True,
    check_every: int = 32,
    on_tokens: Callable[[int], None] | None = None,
    compile: bool | None = None,
) -> torch.Tensor:
    """Greedy continuation of a left-padded batch with a static KV cache (module doc).

    Args:
        model: a Llama 4 causal LM (``Llama4ForCausalLM``/``Llama4ForConditionalGeneration``, PEFT-wrapped or not),
            in eval mode.
        input_ids: (B, P) int64, left-padded, on the model's device.
        attention_mask: (B, P) 0/1, 0 on the left padding; the last column is 1 in every row. A row of padding only
            except its last token still decodes from that token.
        max_new_tokens: tokens to generate per sequence (>= 1).
        eos_token_ids: ids that end a sequence (the EOS itself is kept in the output); an int (Python, NumPy or a
            0-d tensor) or a sequence, which may be empty (then every sequence runs ``max_new_tokens``).
        pad_token_id: written after a sequence's EOS.
        cuda_graph: capture the decode step in a CUDA graph (CUDA only; ignored on the CPU).
        check_every: decode steps between host checks for "all sequences stopped".
        on_tokens: called with the number of new tokens per sequence generated so far (progress).
        compile: compile the decode step with ``torch.compile`` before capturing it (module doc); None: on CUDA
            when ``MEDTUNE_DECODE_COMPILE=1`` and compiling has not failed in this process. On the CPU only when
            True (the tests use it to check that the compiled step gives the same tokens).

    Returns:
        (B, max_new_tokens) int64 new tokens on the model's device; ``pad_token_id`` after each sequence's EOS and
        in the columns never generated once all sequences stopped.

    Raises:
        ValueError: ``max_new_tokens`` or ``check_every`` < 1; shapes differ or are empty; the model is not Llama 4;
            a row is all padding; the batch is right-padded; ``eos_token_ids`` or ``pad_token_id`` is None;
            P + max_new_tokens exceeds the attention chunk
            (:func:`fits_static_cache`; use ``model.generate`` then).
    """
    from transformers.cache_utils import Cache, StaticLayer

    if not (max_new_tokens >= 1 and check_every >= 1):  # NaN too: it never equals a step, so no early stop
        raise ValueError(f"max_new_tokens and check_every must be >= 1, got {max_new_tokens} and {check_every}")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be (batch, prompt length), neither empty")
    if not _accepts_mask_mapping(model):
        raise ValueError(f"greedy_decode serves Llama 4 models; {type(model).__name__} is not one: use model.generate")
    real = attention_mask.bool()
    empty = (~real.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of attention_mask are all padding (an empty prompt): give every row at least "
                         "one token")
    if not bool(real[:, -1].all()):
        raise ValueError("the batch is right-padded (attention_mask is 0 in the last column): tokenize with "
                         "tokenizer.padding_side = 'left'")
    if eos_token_ids is None:
        raise ValueError("eos_token_ids is None: give the tokenizer's eos_token_id, or [] to decode max_new_tokens "
                         "tokens for every sequence")
    eos_token_ids = torch.as_tensor(eos_token_ids).reshape(-1).tolist()  # an int, a NumPy or 0-d tensor id, a list
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: give the tokenizer's pad token id (Llama 4: <|finetune_right_pad|>)")
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if not fits_static_cache(model, total):
        raise ValueError(f"{total} positions exceed the attention chunk "
                         f"({_text_config(model).attention_chunk_size}); decode with model.generate")
    device = input_ids.device
    chunk = getattr(_text_config(model), "attention_chunk_size", None)
    # one full-length static layer per decoder layer, the chunked ones included: with ``total`` within the chunk they
    # hold the same keys, and transformers' StaticSlidingWindowLayer counts its length in a Python int, which a
    # compiled step would guard on (a recompile per token) and a captured graph would not advance
    cache = Cache(layers=[StaticLayer(max_cache_len=total) for _ in range(_text_config(model).num_hidden_layers)])

    kv_valid = torch.ones(batch, total, dtype=torch.bool, device=device)
    kv_valid[:, :prompt_len] = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=_masks(kv_valid, torch.arange(prompt_len, device=device), chunk),
                position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1)
    del out

    eos = torch.tensor(list(eos_token_ids) or [-1], dtype=torch.long, device=device)  # -1: no token matches
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    tokens[:, 0] = first
    finished = (first[:, None] == eos[None]).any(-1)
    ids = first[:, None].clone()  # (B, 1) the token fed to the next step
    pos = positions[:, -1:] + 1  # (B, 1) its position
    cur = torch.tensor([prompt_len], dtype=torch.long, device=device)  # its cache slot
    col = torch.ones(batch, 1, dtype=torch.long, device=device)  # its column in ``tokens``
    pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)

    def step() -> None:
        logits = model(input_ids=ids, attention_mask=_masks(kv_valid, cur, chunk), position_ids=pos,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        nxt = torch.where(finished, pad, logits[:, -1].argmax(-1))
        tokens.scatter_(1, col.clamp(max=max_new_tokens - 1), nxt[:, None])
        finished.logical_or_((nxt[:, None] == eos[None]).any(-1))
        ids.copy_(nxt[:, None])
        pos.add_(1)
        cur.add_(1)
        col.add_(1)

    steps = max_new_tokens - 1
    graph = None
    done = 0
    run = step
    if compile is None:
        compile = COMPILE_DEFAULT and device.type == "cuda" and not _COMPILE_FAILED
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if compile and steps > 1:
        counters = [tokens, finished, ids, pos, cur, col] + [layer.cumulative_length for layer in cache.layers]
        state = [t.clone() for t in counters]
        try:
            compiled = torch.compile(step, dynamic=False)
            _on_side_stream(side, compiled)  # the first step: compiles, then runs
            run, done = compiled, 1
        except Exception as err:  # noqa: BLE001 - any compiler failure: decode uncompiled, say so once
            for t, saved in zip(counters, state, strict=True):
                t.copy_(saved)  # a step that failed part-way may have moved the counters (the cache's own too)
            _COMPILE_FAILED.append(f"{type(err).__name__}: {str(err)[:500]}")
            logger.warning("torch.compile of the decode step failed (%s); decoding uncompiled for the rest of this "
                           "process", _COMPILE_FAILED[0])
    use_graph = cuda_graph and device.type == "cuda" and steps - done > 1
    if use_graph:
        if not done:  # warm-up, a real step: builds the kernels, sizes the workspace
            _on_side_stream(side, run)
            done = 1
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                run()
        except RuntimeError as err:  # something in the forward needs the host: decode eagerly, say so once
            logger.warning("decode step could not be captured in a CUDA graph (%s); decoding eagerly", err)
            graph = None
    while done < steps:
        graph.replay() if graph is not None else run()
        done += 1
        if done % check_every == 0 or done == steps:
            if on_tokens is not None:
                on_tokens(done + 1)
            if bool(finished.all()):
                break
    return tokens


def _on_side_stream(side: torch.cuda.Stream | None, fn: Callable[[], None]) -> None:
    """``fn()`` on ``side`` (CUDA: warm-up before graph capture must not run on the capturing stream), or directly."""
    if side is None:
        fn()
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(side.device).wait_stream(side)
