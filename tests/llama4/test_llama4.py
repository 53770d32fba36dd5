"""medtune.llama4 on CPU, fp32, tiny Llama 4 models: sparse dispatch == transformers' dense MoE, NF4 experts ==
bitsandbytes' own round trip, no dequantized weights kept for backward, and a Scout-layout checkpoint that loads,
trains under SFTTrainer with LoRA, and generates."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers.models.llama4.modeling_llama4 import Llama4TextExperts, Llama4TextMoe

from medtune import llama4 as l4

# CI lays shared/ beside the clone
TOKENIZER = str(Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "llama4")


def tiny_text(**overrides):
    dims = dict(vocab_size=512, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1)
    return l4.scout_text_config(**{**dims, **overrides})


def make_moe(seed: int, **overrides) -> Llama4TextMoe:
    torch.manual_seed(seed)
    moe = Llama4TextMoe(tiny_text(**overrides))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe


def sparse_copy(moe: Llama4TextMoe) -> Llama4TextMoe:
    sparse = copy.deepcopy(moe)
    sparse.__class__ = l4.Llama4SparseMoe
    sparse.experts.__class__ = l4.Llama4SparseExperts
    return sparse


def out_and_grad(moe, x, seed=0):
    """MoE output and d(sum(out * w))/dx for a fixed random w (a generic upstream gradient)."""
    x = x.detach().requires_grad_(True)
    out, logits = moe(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    return out.detach(), logits.detach(), grad


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "top_k,experts,batch,seq,hidden",
    [(1, 4, 2, 9, 64), (2, 4, 3, 5, 64), (1, 8, 1, 3, 32), (2, 16, 2, 17, 48)],
)
def test_sparse_matches_transformers_dense(top_k, experts, batch, seq, hidden):
    moe = make_moe(seed=top_k * 100 + experts, num_experts_per_tok=top_k, num_local_experts=experts,
                   hidden_size=hidden)
    sparse = sparse_copy(moe)
    for trial in range(3):  # fresh inputs each time
        x = torch.randn(batch, seq, hidden, generator=torch.Generator().manual_seed(trial))
        ref_out, ref_logits, ref_grad = out_and_grad(moe, x, seed=trial)
        out, logits, grad = out_and_grad(sparse, x, seed=trial)
        assert torch.equal(logits, ref_logits)
        assert rel(out, ref_out) < 1e-5
        assert rel(grad, ref_grad) < 1e-5


def test_sparse_router_gradient_matches_and_idle_experts():
    # 3 tokens, 8 experts, top-1: at least 5 experts get no token.
    moe = make_moe(seed=7, num_local_experts=8)
    sparse = sparse_copy(moe)
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(3))
    idle = 8 - torch.topk(moe.router(x.reshape(-1, 64))[1], 1).indices.unique().numel()
    assert idle >= 5
    grads = []
    for m in (moe, sparse):
        m.zero_grad()
        out, _ = m(x)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        grads.append((m.router.weight.grad.clone(), m.shared_expert.up_proj.weight.grad.clone(),
                      m.experts.gate_up_proj.grad.clone()))
    for ref, got in zip(*grads, strict=True):
        assert rel(got, ref) < 1e-5


def test_sparse_experts_validate_counts():
    moe = sparse_copy(make_moe(seed=1))
    with pytest.raises(ValueError, match="counts"):
        moe.experts(torch.randn(5, 64), [1, 1, 1, 1])


def nf4_pair(seed=11, double_quant=False, **overrides):
    """(sparse MoE with NF4 experts, same MoE with fp32 weights = dequantize(quantize(W)), original fp32 MoE)."""
    moe = make_moe(seed=seed, **overrides)
    nf4 = sparse_copy(moe)
    nf4.experts = l4.Llama4NF4Experts.from_experts(moe.experts, double_quant=double_quant,
                                                   compute_dtype=torch.float32)
    roundtrip = sparse_copy(moe)
    gate_up, down = nf4.experts.dequantized_weights()
    with torch.no_grad():
        roundtrip.experts.gate_up_proj.copy_(gate_up)
        roundtrip.experts.down_proj.copy_(down)
    return nf4, roundtrip, moe


@pytest.mark.parametrize("double_quant,top_k", [(False, 1), (True, 2)])
def test_nf4_experts_equal_bitsandbytes_roundtrip(double_quant, top_k):
    nf4, roundtrip, original = nf4_pair(double_quant=double_quant, num_experts_per_tok=top_k)
    # The stored weights are bitsandbytes' own NF4 round trip of the originals: error bounded by it.
    w_err = max(rel(roundtrip.experts.gate_up_proj, original.experts.gate_up_proj),
                rel(roundtrip.experts.down_proj, original.experts.down_proj))
    assert 0.01 < w_err < 0.15  # NF4 on Gaussian weights: ~10% relative error per weight matrix
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(5))
    out, _, grad = out_and_grad(nf4, x)
    rt_out, _, rt_grad = out_and_grad(roundtrip, x)
    assert rel(out, rt_out) < 1e-6 and rel(grad, rt_grad) < 1e-6
    ref_out, _, ref_grad = out_and_grad(original, x)
    assert rel(out, ref_out) < 3 * w_err and rel(grad, ref_grad) < 3 * w_err


def test_nf4_dense_layout_matches_transformers_experts():
    nf4, roundtrip, _ = nf4_pair()
    x = torch.randn(4 * 6, 64, generator=torch.Generator().manual_seed(2))  # E * T rows, as transformers lays them out
    assert rel(nf4.experts(x), Llama4TextExperts.forward(roundtrip.experts, x)) < 1e-6


def test_nf4_backward_keeps_no_dequantized_weights():
    nf4, roundtrip, _ = nf4_pair()
    xs = torch.randn(18, 64, requires_grad=True)  # tokens sorted by expert, as Llama4SparseMoe passes them
    counts = [5, 0, 9, 4]  # expert 1 gets no token
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = nf4.experts(xs, counts)
    # Everything autograd keeps for the NF4 experts is their input: no weight, no (N, 2I) activation.
    assert len(saved) == 1 and saved[0].data_ptr() == xs.data_ptr()
    (grad,) = torch.autograd.grad(out.sum(), xs)
    xr = xs.detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(roundtrip.experts(xr, counts).sum(), xr)
    assert rel(grad, ref) < 1e-6


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_grouped_dequantize_is_bitsandbytes_per_expert(double_quant):
    # hidden 128, expert dim 64: gate_up has 256 absmax blocks per expert (nested blocks align: one call for all
    # experts), down 128 (nested blocks do not align: per-expert absmax path). Both must be bit-identical to
    # bitsandbytes dequantizing each expert with its own QuantState.
    import bitsandbytes.functional as bnbf

    moe = make_moe(seed=21, hidden_size=128, intermediate_size=64)
    nf4 = l4.Llama4NF4Experts.from_experts(moe.experts, double_quant=double_quant, compute_dtype=torch.float32)
    for name, weight in (("gate_up", moe.experts.gate_up_proj), ("down", moe.experts.down_proj)):
        every = nf4.dequantize_experts(name)
        assert every.shape == weight.shape
        for e in range(4):
            q, state = bnbf.quantize_4bit(weight[e].detach(), blocksize=64, compress_statistics=double_quant,
                                          quant_type="nf4")
            assert torch.equal(every[e], bnbf.dequantize_4bit(q, quant_state=state))
        assert torch.equal(nf4.dequantize_experts(name, 1, 3), every[1:3])


def test_nf4_dequant_groups_and_device_counts_give_the_same_result():
    nf4, roundtrip, _ = nf4_pair(double_quant=True)
    xs = torch.randn(18, 64, generator=torch.Generator().manual_seed(4))
    counts = [5, 0, 9, 4]
    results = []
    for group, cnt in ((None, counts), (2, counts), (1, torch.tensor(counts)), (3, torch.tensor(counts))):
        nf4.experts.dequant_group = group
        x = xs.clone().requires_grad_(True)
        out = nf4.experts(x, cnt)
        (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), x)
        results.append((out.detach(), grad))
    nf4.experts.dequant_group = None
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])
    # Generation-sized inputs (fewer than 2 rows per expert): only experts with tokens are dequantized.
    calls = []
    dequantize = nf4.experts.dequantize_experts
    nf4.experts.dequantize_experts = lambda *a: calls.append(a) or dequantize(*a)
    few = nf4.experts(xs[:3], torch.tensor([1, 0, 2, 0]))
    del nf4.experts.dequantize_experts
    assert sorted(calls) == [("down", 0, 1), ("down", 2, 3), ("gate_up", 0, 1), ("gate_up", 2, 3)]
    assert rel(few.detach(), roundtrip.experts(xs[:3], [1, 0, 2, 0]).detach()) < 1e-6
    with pytest.raises(ValueError, match="counts"):
        nf4.experts(xs, torch.tensor([5, 9, 4]))


def test_checkpoint_recompute_skips_nf4_experts_with_the_same_gradients(monkeypatch):
    # Non-reentrant gradient checkpointing per decoder layer: the recompute does not run the NF4 experts (their
    # output is not needed to rebuild any saved tensor), gradients stay those of the model without checkpointing.
    model = l4.prepare_llama4_for_qlora(tiny_model(vocab=512, seed=5), compute_dtype=torch.float32)
    for p in model.parameters():  # make the routed experts matter: larger router/shared weights
        torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    calls = []
    dequantize = l4.Llama4NF4Experts.dequantize_experts
    monkeypatch.setattr(l4.Llama4NF4Experts, "dequantize_experts",
                        lambda self, *a, **k: calls.append(a) or dequantize(self, *a, **k))

    def grads(checkpointing: bool, skip: bool = True):
        monkeypatch.setattr(l4.Llama4SparseMoe, "skip_recompute", skip)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.train()
        model.zero_grad()
        calls.clear()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    ref, n_plain = grads(False)
    got, n_skip = grads(True)
    full, n_full = grads(True, skip=False)
    assert n_plain == n_skip == 2 * 4 and n_full == 2 * 6  # 2 layers x (gate_up, down) x (fwd, [recompute,] bwd)
    assert ref.keys() == got.keys() == full.keys() and len(ref) > 10
    assert all(rel(got[n], ref[n]) < 1e-5 and rel(full[n], ref[n]) < 1e-5 for n in ref)
    assert any("router" in n for n in ref)  # gradients through the routing scores are covered too


def test_nf4_size_is_about_half_a_byte_per_weight():
    nf4, _, original = nf4_pair(double_quant=False)
    per_weight = l4.weights_gib(nf4.experts) / l4.weights_gib(original.experts) * 4  # original fp32: 4 B/weight
    assert abs(per_weight - (0.5 + 4 / 64)) < 1e-3  # packed nibbles + one fp32 absmax per 64 weights


def tiny_model(cls_name="Llama4ForCausalLM", seed=0, vocab=201135):
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    special = dict(pad_token_id=200018, eos_token_id=200008, bos_token_id=200000) if vocab > 200018 else {}
    # every Linear's in_features a multiple of 64: bitsandbytes 0.50.2 repacks 4-bit weights for inference on CPUs
    # with AVX512-BF16 and fails on narrower ones (functional._convert_weight_packed_for_cpu: absmax reshape to [K, 0])
    text = tiny_text(vocab_size=vocab, intermediate_size=64, **special)
    if cls_name == "Llama4ForCausalLM":
        return Llama4ForCausalLM(text)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                  vision_output_dim=64, image_size=56, patch_size=14, projector_input_dim=64,
                  projector_output_dim=64)
    return Llama4ForConditionalGeneration(Llama4Config(text_config=text.to_dict(), vision_config=vision))


def test_prepare_with_flags_off_leaves_transformers_model_untouched():
    model = tiny_model()
    before = {n: (type(m), m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    l4.prepare_llama4_for_qlora(model, sparse_moe=False, quantize_experts=False)
    assert {n: (type(m), m) for n, m in model.named_modules()} == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert l4.is_llama4(model) and l4.is_llama4(model.config)


def test_prepare_is_noop_for_other_models(caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with caplog.at_level("INFO", logger="medtune.llama4"):
        assert l4.prepare_llama4_for_qlora(model) is model
    assert "not Llama 4" in caplog.text and not l4.is_llama4(model)


def test_peft_targets_with_nf4_experts_and_routed_lora_rules():
    from peft import LoraConfig, get_peft_model

    model = l4.prepare_llama4_for_qlora(tiny_model(vocab=512), compute_dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets))
    wrapped = [n for n, m in peft_model.named_modules()
               if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B"))]
    assert len(wrapped) == 2 * 7  # 2 layers x (4 attention + 3 shared-expert projections)
    assert all(".self_attn." in n or ".shared_expert." in n for n in wrapped)
    routed = LoraConfig(r=4, target_parameters=list(l4.ROUTED_EXPERT_PARAMETERS), lora_dropout=0.1)
    with pytest.raises(ValueError, match="lora_dropout"):
        l4.check_lora_config(model, routed)
    routed.lora_dropout = 0.0
    l4.check_lora_config(model, routed)  # NF4 experts take routed LoRA too: tests/llama4/test_expert_lora.py


def test_routed_expert_lora_with_bf16_sparse_experts_trains():
    from peft import LoraConfig, get_peft_model

    model = tiny_model(vocab=512)
    reference = copy.deepcopy(model)
    l4.prepare_llama4_for_qlora(model, quantize_experts=False)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"],
                        target_parameters=list(l4.ROUTED_EXPERT_PARAMETERS))
    l4.check_lora_config(model, config)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits = reference(ids).logits
    peft_model = get_peft_model(model, config)
    lora_b = [p for n, p in peft_model.named_parameters() if "experts" in n and "lora_B" in n]
    assert len(lora_b) == 4  # gate_up_proj and down_proj in each of 2 layers
    assert rel(peft_model(ids).logits.detach(), ref_logits) < 1e-5  # LoRA B starts at zero: same function
    for p in lora_b:
        torch.nn.init.normal_(p, std=0.1)
    loss = peft_model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_checkpoint_in_scout_layout_loads_trains_and_generates(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from safetensors import safe_open
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from medtune.compat import apply_llama4_trl_fixes

    source = tiny_model("Llama4ForConditionalGeneration", seed=3)
    source.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.layers.1.feed_forward.experts.gate_up_proj" in keys

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = l4.load_llama4_qlora(tmp_path / "ckpt", bnb, device="cpu", torch_dtype=torch.float32)
    moe = model.language_model.model.layers[1].feed_forward
    assert isinstance(moe, l4.Llama4SparseMoe) and isinstance(moe.experts, l4.Llama4NF4Experts)
    assert type(model.language_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ref = l4.Llama4NF4Experts.from_experts(source.language_model.model.layers[1].feed_forward.experts,
                                           compute_dtype=torch.float32)
    assert torch.equal(moe.experts.gate_up_packed, ref.gate_up_packed)
    assert torch.equal(moe.experts.down_absmax, ref.down_absmax)

    # Saved NF4 experts are reused as they are.
    l4.save_quantized(model, tmp_path / "ckpt")
    again = l4.load_llama4_qlora(tmp_path / "ckpt", bnb, device="cpu", torch_dtype=torch.float32)
    assert torch.equal(again.language_model.model.layers[0].feed_forward.experts.gate_up_packed,
                       model.language_model.model.layers[0].feed_forward.experts.gate_up_packed)

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    apply_llama4_trl_fixes(model)
    data = Dataset.from_list([{"text": f"Question {i}: what is {i} plus {i}? Answer: {2 * i}."} for i in range(6)])
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                     seed=0, max_length=32, gradient_checkpointing=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert changed and all("lora_" in n for n in changed)

    trainer.model.eval()
    prompt = tokenizer("Question 1: what is", return_tensors="pt")
    out = trainer.model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)
