"""LoRA on the NF4 routed experts (PEFT ``target_parameters``) on CPU, fp32, tiny Llama 4 models.

The reference everywhere is PEFT's own ``target_parameters`` LoRA on bf16-layout experts (here fp32) whose weights
are exactly the NF4 ones dequantized (``Llama4NF4Experts.dequantized_weights``), with the same LoRA weights: the
loss, the logits and every LoRA gradient must agree (relative Frobenius difference below ``TOL``; measured: ~4e-7),
with and without gradient checkpointing; the adapter files must be PEFT's, key for key and shape for shape, and load
on either model; experts without rows get no compute and exactly zero LoRA gradient; SFTTrainer trains it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from medtune import llama4 as l4
from medtune.llama4 import dispatch, expert_lora
from tests.llama4.test_llama4 import TOKENIZER, rel, tiny_model, tiny_text

ROUTED = list(l4.ROUTED_EXPERT_PARAMETERS)
TOL = 1e-5  # relative: fp32 sums in another order (x W + s (x L) R vs x (W + s L R)); measured below 1e-6
VOCAB = 512


def base_model(seed: int = 0, top_k: int = 1):
    """Tiny transformers Llama4ForCausalLM (2 layers, 4 experts, H = I = 64, top-k routing), weights N(0, 0.1) so the
    experts matter."""
    from transformers import Llama4ForCausalLM

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(tiny_text(vocab_size=VOCAB, intermediate_size=64, num_experts_per_tok=top_k))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def nf4_model(base):
    """``base`` with NF4 routed experts and the sparse MoE, computing in fp32."""
    return l4.prepare_llama4_for_qlora(copy.deepcopy(base), compute_dtype=torch.float32)


def dequantized_copy(base, nf4):
    """``base`` as transformers built it (dense MoE, expert parameters), the expert weights replaced by ``nf4``'s
    dequantized ones."""
    plain = copy.deepcopy(base)
    for layer, nf4_layer in zip(plain.model.layers, nf4.model.layers, strict=True):
        gate_up, down = nf4_layer.feed_forward.experts.dequantized_weights()
        with torch.no_grad():
            layer.feed_forward.experts.gate_up_proj.copy_(gate_up)
            layer.feed_forward.experts.down_proj.copy_(down)
    return plain


def nf4_and_reference(base):
    """(NF4 experts + sparse MoE; the same model with bf16-layout expert parameters (fp32 here) holding the NF4
    weights dequantized, sparse MoE): the function the LoRA must reproduce, PEFT's own way."""
    nf4 = nf4_model(base)
    return nf4, l4.prepare_llama4_for_qlora(dequantized_copy(base, nf4), quantize_experts=False)


def lora_config(**overrides) -> LoraConfig:
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], target_parameters=ROUTED)
    return LoraConfig(**{**kwargs, **overrides})


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def peft_pair(seed: int = 0, base=None, **config):
    """PEFT on both models with identical LoRA weights, lora_B drawn non-zero (the adapters change the function)."""
    nf4, ref = nf4_and_reference(base if base is not None else base_model(seed))
    ref, nf4 = get_peft_model(ref, lora_config(**config)), get_peft_model(nf4, lora_config(**config))
    gen = torch.Generator().manual_seed(seed + 1)
    theirs, ours = lora_params(ref), lora_params(nf4)
    assert theirs.keys() == ours.keys() and any("experts" in n for n in ours)
    with torch.no_grad():
        for name, p in theirs.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            ours[name].copy_(p)
    return nf4, ref


def ids(batch=2, seq=12, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, tokens):
    model.zero_grad()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in lora_params(model).items()}


@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "r": 4, "lora_alpha": 8}, {"top_k": 2}])
def test_nf4_expert_lora_equals_peft_on_dequantized_experts(config):
    top_k = config.pop("top_k", 1)
    nf4, ref = peft_pair(3, base=base_model(3, top_k=top_k), **config)
    experts = nf4.base_model.model.model.layers[0].feed_forward.experts
    assert type(experts).__name__ == "ParamWrapper" and experts.parameter_name == "down_proj"
    assert isinstance(expert_lora.nf4_under(experts), l4.Llama4NF4Experts)
    tokens = ids()
    ref_loss, ref_grads = loss_and_grads(ref, tokens)
    loss, grads = loss_and_grads(nf4, tokens)
    assert abs(loss - ref_loss) / ref_loss < 1e-6
    assert grads.keys() == ref_grads.keys()
    assert sum("experts" in n for n in grads) == 2 * 4 and sum("self_attn" in n for n in grads) == 2 * 4
    worst = max(rel(grads[n], ref_grads[n]) for n in grads)
    assert worst < TOL, worst
    assert all(ref_grads[n].norm() > 0 for n in ref_grads)  # every adapter matters in this set-up
    with torch.no_grad():  # inference (no autograd Function): same logits
        assert rel(nf4(tokens).logits, ref(tokens).logits) < TOL


def test_grouped_products_equal_the_per_expert_loop(monkeypatch):
    # The torch._grouped_mm branches (CUDA bf16 sm90 in real runs) forced on the CPU, where torch 2.13 has a
    # fallback for them: same loss and gradients as the per-expert loop, and the branches really ran.
    nf4, _ = peft_pair(5)
    tokens = ids(seed=1)
    loop_loss, loop_grads = loss_and_grads(nf4, tokens)
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(l4, "_grouped_mm_ok", lambda x: True)  # the NF4 base
    monkeypatch.setattr(dispatch, "grouped_mm_ok", lambda x: True)  # the LoRA products
    monkeypatch.setattr(torch, "_grouped_mm",
                        lambda a, b, **k: calls.append((a.dim(), b.dim())) or grouped_mm(a, b, **k))
    loss, grads = loss_and_grads(nf4, tokens)
    assert (2, 2) in calls and (2, 3) in calls  # weight gradients (groups along K) and row groups
    assert abs(loss - loop_loss) / loop_loss < 1e-6
    assert max(rel(grads[n], loop_grads[n]) for n in grads) < TOL


def test_gradient_checkpointing_skips_the_experts_and_keeps_the_gradients(monkeypatch):
    nf4, _ = peft_pair(7)
    model = nf4.base_model.model
    tokens = ids(seed=2)
    calls = []
    dequantize = l4.Llama4NF4Experts.dequantize_experts
    monkeypatch.setattr(l4.Llama4NF4Experts, "dequantize_experts",
                        lambda self, *a, **k: calls.append(a) or dequantize(self, *a, **k))

    def run(checkpointing: bool, skip: bool = True):
        monkeypatch.setattr(l4.Llama4SparseMoe, "skip_recompute", skip)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        nf4.train()
        calls.clear()
        loss, grads = loss_and_grads(nf4, tokens)
        return loss, grads, len(calls)

    plain_loss, plain, n_plain = run(False)
    ckpt_loss, ckpt, n_ckpt = run(True)
    full_loss, full, n_full = run(True, skip=False)
    # per layer: forward gate_up + down; backward down, gate_up (recompute), gate_up (input gradient)
    assert n_plain == n_ckpt == 2 * 5 and n_full == 2 * 7
    assert plain_loss == ckpt_loss == full_loss
    assert max(max(rel(ckpt[n], plain[n]), rel(full[n], plain[n])) for n in plain) < TOL
    assert all(plain[n].norm() > 0 for n in plain)


def test_adapter_files_are_peft_s_and_load_on_bf16_and_nf4_models(tmp_path, monkeypatch):
    base = base_model(11)
    nf4, ref = peft_pair(11, base=base)
    nf4.save_pretrained(tmp_path / "nf4")
    ref.save_pretrained(tmp_path / "bf16")
    files = {}
    for name in ("nf4", "bf16"):
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") as f:
            files[name] = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: v.shape for k, v in files["nf4"].items()} == {k: v.shape for k, v in files["bf16"].items()}
    assert all(torch.equal(v, files["bf16"][k]) for k, v in files["nf4"].items())
    layer = "base_model.model.model.layers.1.feed_forward.experts"
    assert files["nf4"][f"{layer}.lora_A.weight"].shape == (8 * 4, 64)  # down: A (r*E, H)
    assert files["nf4"][f"{layer}.base_layer.lora_A.weight"].shape == (8 * 4, 128)  # gate_up: A (r*E, 2I)
    assert files["nf4"][f"{layer}.base_layer.lora_B.weight"].shape == (64, 8 * 4)  # gate_up: B (H, r*E)
    saved = json.loads((tmp_path / "nf4" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(ROUTED)

    tokens = ids(seed=3)
    with torch.no_grad():
        expected = nf4(tokens).logits
        assert rel(ref(tokens).logits, expected) < TOL
        without = nf4_model(base)(tokens).logits
        assert rel(without, expected) > 1e-3  # the adapter changes the function
    # The NF4 run's adapter onto: transformers' model as built (dense MoE; expert parameters = the dequantized NF4
    # weights), medtune's bf16-experts preparation of it, a fresh NF4 model.
    plain = dequantized_copy(base, nf4_model(base))
    targets = [plain, l4.prepare_llama4_for_qlora(copy.deepcopy(plain), quantize_experts=False), nf4_model(base)]
    for target in targets:
        loaded = PeftModel.from_pretrained(target, str(tmp_path / "nf4")).eval()
        assert {n: p.shape for n, p in lora_params(loaded).items()} == {n: p.shape for n, p in lora_params(nf4).items()}
        with torch.no_grad():
            assert rel(loaded(tokens).logits, expected) < TOL
    # PEFT's own bf16-experts adapter onto a fresh NF4 model, inference through the fused NF4 kernel (decode's
    # path; Triton's interpreter here), with the adapter on and off.
    loaded = PeftModel.from_pretrained(nf4_model(base), str(tmp_path / "bf16")).eval()
    monkeypatch.setattr(l4.Llama4NF4Experts, "fused", "always")
    fused = []
    kernel = l4.kernels.nf4_moe_matmul
    monkeypatch.setattr(l4.kernels, "nf4_moe_matmul", lambda *a, **k: fused.append(k["gated"]) or kernel(*a, **k))
    with torch.no_grad():
        assert rel(loaded(tokens).logits, expected) < TOL
        assert fused and not any(fused)  # the LoRA path ran the ungated kernel for both projections
        with loaded.disable_adapter():
            assert rel(loaded(tokens).logits, without) < TOL


def test_two_active_adapters_add_up_as_peft_adds_them():
    nf4, ref = peft_pair(21)
    gen = torch.Generator().manual_seed(5)
    for model in (ref, nf4):
        model.add_adapter("second", lora_config(r=4, lora_alpha=4))
    ours = dict(nf4.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".second." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                ours[name].copy_(p)
    tokens = ids(seed=4)
    with torch.no_grad():
        one = nf4(tokens).logits
        for model in (ref, nf4):
            model.base_model.set_adapter(["default", "second"])
        both = nf4(tokens).logits
        assert rel(both, ref(tokens).logits) < TOL and rel(both, one) > 1e-2


class _MatmulShapes(TorchFunctionMode):
    """Records the operand shapes of every matrix product."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch._grouped_mm):
            self.shapes.append(tuple(tuple(a.shape) for a in args[:2]))
        return func(*args, **(kwargs or {}))


def test_idle_experts_get_no_compute_and_zero_lora_gradient(monkeypatch):
    nf4, ref = peft_pair(13)
    ours = nf4.base_model.model.model.layers[0].feed_forward.experts
    theirs = ref.base_model.model.model.layers[0].feed_forward.experts
    experts = expert_lora.nf4_under(ours)
    counts = torch.tensor([5, 0, 7, 0])  # experts 1 and 3 receive no rows
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(1))
    seen = []
    spans = expert_lora._Routing.spans
    monkeypatch.setattr(expert_lora._Routing, "spans", lambda self: seen.extend(e for e, _, _ in spans(self)) or
                        spans(self))

    def out_and_grads(module, fn):
        module.zero_grad()
        xx = x.clone().requires_grad_(True)
        out = fn(xx)
        (out * w).sum().backward()
        params = {n: p.grad.clone() for n, p in module.named_parameters() if "lora_" in n}
        return out.detach(), xx.grad, params

    with _MatmulShapes() as mode:
        out, dx, grads = out_and_grads(ours, lambda xx: expert_lora.routed_forward(ours, experts, xx, counts))
    ref_out, ref_dx, ref_grads = out_and_grads(theirs, lambda xx: theirs(xx, counts))
    assert rel(out, ref_out) < TOL and rel(dx, ref_dx) < TOL
    assert grads.keys() == ref_grads.keys() and len(grads) == 4
    assert max(rel(grads[n], ref_grads[n]) for n in grads) < TOL
    assert set(seen) == {0, 2}  # the LoRA products iterate over experts 0 and 2 only
    assert mode.shapes and all(0 not in s for shapes in mode.shapes for s in shapes)  # no product over 0 rows
    r, num = 8, 4
    for name, g in grads.items():
        per_expert = g.view(num, r, -1) if "lora_A" in name else g.view(g.shape[0], r, num).permute(2, 0, 1)
        assert torch.equal(per_expert[[1, 3]], torch.zeros_like(per_expert[[1, 3]])), name  # idle: exactly 0
        assert all(per_expert[e].norm() > 0 for e in (0, 2)), name


def test_check_lora_config_accepts_nf4_experts_and_keeps_the_refusals():
    model = l4.prepare_llama4_for_qlora(tiny_model(vocab=VOCAB), compute_dtype=torch.float32)
    l4.check_lora_config(model, lora_config())  # sparse MoE + NF4 experts: fine
    with pytest.raises(ValueError, match="lora_dropout"):
        l4.check_lora_config(model, lora_config(lora_dropout=0.05))
    dense = l4.prepare_llama4_for_qlora(tiny_model(vocab=VOCAB), sparse_moe=False, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="sparse_moe=True"):
        l4.check_lora_config(dense, lora_config())
    assert l4.weights_gib(model.model.layers[0].feed_forward.experts) < 0.001  # placeholders count nothing


def test_placeholders_are_shape_only_and_invisible_to_model_walks():
    model = l4.prepare_llama4_for_qlora(tiny_model(vocab=VOCAB), compute_dtype=torch.float32)
    experts = model.model.layers[0].feed_forward.experts
    own = dict(experts.named_parameters(recurse=False))
    assert list(own) == ["gate_up_proj", "down_proj"]
    assert own["gate_up_proj"].shape == (4, 64, 128) and own["down_proj"].shape == (4, 64, 64)
    assert all(p.dtype == torch.float32 and not p.requires_grad and expert_lora.is_placeholder(p) for p in own.values())
    assert all(p.untyped_storage().nbytes() == 4 for p in own.values())  # one float behind each
    assert not any("experts.gate_up_proj" in n or "experts.down_proj" in n for n, _ in model.named_parameters())
    assert not any("experts.gate_up_proj" in k for k in model.state_dict())
    with pytest.raises(RuntimeError):  # merging a delta into it (PEFT merge) fails loudly
        own["down_proj"].data += 1


def test_sft_trainer_trains_expert_lora_on_nf4_experts(tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from medtune.compat import apply_llama4_trl_fixes

    model = l4.prepare_llama4_for_qlora(tiny_model(seed=17), compute_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    apply_llama4_trl_fixes(model)
    lora = lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    l4.check_lora_config(model, lora)
    data = Dataset.from_list([{"text": f"Question {i}: what is {i} plus {i}? Answer: {2 * i}."} for i in range(6)])
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                     max_length=32, gradient_checkpointing=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    experts = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad and ".experts." in n}
    assert len(experts) == 2 * 4  # (gate_up, down) x (A, B) x 2 layers
    before = {n: p.detach().clone() for n, p in experts.items()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(p, before[n]) for n, p in experts.items())


def test_scout_shaped_adapter_size_is_the_documented_one():
    # PEFT's own adapter on one Scout-shaped layer's routed experts (meta tensors: no memory), bf16 and NF4 alike:
    # r=16 on gate_up and down -> 8,912,896 parameters per layer, 427,819,008 for 48 layers (expert_lora's doc).
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    config = l4.scout_text_config()
    counts = []
    for make in (lambda: Llama4TextExperts(config).to(torch.bfloat16),
                 lambda: l4.Llama4NF4Experts(16, 5120, 8192, device="meta")):
        with torch.device("meta"):
            holder = torch.nn.Module()
            holder.feed_forward = torch.nn.Module()
            holder.feed_forward.router = torch.nn.Linear(5120, 16, bias=False)  # a parameter, as any model has
            holder.feed_forward.experts = make()
        model = get_peft_model(holder, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_parameters=ROUTED))
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # PEFT upcasts bf16
        counts.append((sum(torch.Size(s).numel() for s in shapes.values()), shapes))
    assert counts[0] == counts[1]
    assert counts[0][0] == 8_912_896 and 48 * counts[0][0] == 427_819_008
    assert 48 * counts[0][0] * 2 / 2**30 == pytest.approx(0.797, abs=1e-3)  # GiB in bf16


def test_scout_profile_example_enables_expert_lora_at_rank_16(tmp_path):
    # params/scout.yaml's commented lines, uncommented, with lora_dropout 0: the profile loads, and PEFT puts r=16 on
    # the NF4 routed experts and r=64 on the walkthrough's projections of the (multimodal) Scout-layout model.
    from medtune.settings import config as C

    text = (C.project_root() / "params" / "scout.yaml").read_text(encoding="utf-8")
    for line in ("target_parameters:", "rank_pattern:"):
        assert f"  # {line}" in text
        text = text.replace(f"  # {line}", f"  {line}")
    (tmp_path / "scout.yaml").write_text(text.replace("lora_dropout: 0.05", "lora_dropout: 0.0"), encoding="utf-8")
    cfg = C.load(tmp_path / "scout.yaml")
    assert cfg.llama4_fast and cfg.lora["lora_dropout"] == 0.0
    lora = C.lora_config(cfg)
    model = l4.prepare_llama4_for_qlora(tiny_model("Llama4ForConditionalGeneration", seed=2),
                                        compute_dtype=torch.float32)
    l4.check_lora_config(model, lora)
    shapes = {n: tuple(p.shape) for n, p in get_peft_model(model, lora).named_parameters() if "lora_" in n}
    layer = "base_model.model.language_model.model.layers.0"
    assert shapes[f"{layer}.feed_forward.experts.lora_A.default.weight"] == (16 * 4, 64)  # r * E, H
    assert shapes[f"{layer}.feed_forward.experts.base_layer.lora_B.default.weight"] == (64, 16 * 4)
    assert shapes[f"{layer}.self_attn.q_proj.lora_A.default.weight"] == (64, 64)  # r = 64
    assert not any("vision" in n for n in shapes)
