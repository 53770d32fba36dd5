"""A checkpoint written by hand in the Hub's own layout for Scout (not by ``save_pretrained``): the legacy config.json
of transformers 4.51 (``torch_dtype``, ``"attn_temperature_tuning": 4``), ``language_model.``-prefixed bf16 tensors in
three safetensors shards with an index, one layer's ``gate_up_proj`` and ``down_proj`` in different shards, an untied
LM head. medtune's Llama 4 loader must read every tensor into the right place: no missing or unexpected key, NF4
experts identical to quantizing the raw tensors, and a working forward and generate."""

from __future__ import annotations

import json

import bitsandbytes.functional as bnbf
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, Llama4Config, Llama4ForConditionalGeneration

from medtune import llama4 as l4

TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
            pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, vision_output_dim=64,
              image_size=56, patch_size=14, projector_input_dim=64, projector_output_dim=64)
GATE_UP, DOWN = ("language_model.model.layers.1.feed_forward.experts.gate_up_proj",
                 "language_model.model.layers.1.feed_forward.experts.down_proj")


def hub_layout_checkpoint(folder):
    """Write the tiny model as the Hub holds Scout; return its bf16 tensors by key."""
    torch.manual_seed(0)
    source = Llama4ForConditionalGeneration(Llama4Config(text_config=TEXT, vision_config=VISION))
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in source.state_dict().items()}
    assert GATE_UP in tensors and DOWN in tensors and "language_model.lm_head.weight" in tensors
    keys = sorted(tensors)
    shards = [[k for k in keys if k != DOWN and (k < GATE_UP)], [GATE_UP], []]
    shards[1] += [k for k in keys if k > GATE_UP and k != DOWN and "vision" not in k]
    shards[2] = [k for k in keys if k not in shards[0] and k not in shards[1]]
    assert DOWN in shards[2] and GATE_UP in shards[1] and sum(map(len, shards)) == len(keys)
    folder.mkdir()
    weight_map = {}
    for n, names in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in names}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    conf = source.config.to_dict()
    conf["torch_dtype"] = "bfloat16"
    conf.pop("dtype", None)
    conf["text_config"]["attn_temperature_tuning"] = 4  # as 4.51.x re-saved it
    conf["transformers_version"] = "4.51.0.dev0"
    (folder / "config.json").write_text(json.dumps(conf))
    return tensors


def test_hub_layout_checkpoint_loads_every_tensor_into_place(tmp_path):
    folder = tmp_path / "scout-hub-layout"
    raw = hub_layout_checkpoint(folder)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = l4.load_llama4_qlora(folder, bnb, device="cpu", torch_dtype=torch.float32)
    loaded = model.state_dict()

    # no unexpected key: every tensor of the shards is a parameter of the model (experts: NF4 buffers, checked below)
    experts = {k for k in raw if ".feed_forward.experts." in k}
    assert len(experts) == 4  # 2 layers x (gate_up, down)
    assert set(raw) - experts <= set(loaded), sorted(set(raw) - experts - set(loaded))[:5]
    # no missing key: every plain tensor holds the checkpoint's value (a skipped one would keep its random init)
    for key in set(raw) - experts:
        value = loaded[key]
        if value.dtype == torch.uint8:  # a 4-bit Linear's packed weight: compare its dequantized value
            module = model.get_submodule(key.removesuffix(".weight"))
            value = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            q, state = bnbf.quantize_4bit(raw[key].float(), blocksize=64, quant_type="nf4")
            assert torch.equal(value, bnbf.dequantize_4bit(q, state)), key
        else:
            assert torch.equal(value, raw[key].to(value.dtype)), key
    # the LM head is its own tensor, not the embedding
    lm_head = model.language_model.lm_head.weight
    assert lm_head.data_ptr() != model.language_model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(lm_head, raw["language_model.lm_head.weight"].float())

    # NF4 experts equal to quantizing the raw tensors of their own layer, across the shard boundary
    for layer in (0, 1):
        got = model.language_model.model.layers[layer].feed_forward.experts
        assert isinstance(got, l4.Llama4NF4Experts)
        want = l4.Llama4NF4Experts(4, 64, 64, compute_dtype=torch.float32)
        prefix = f"language_model.model.layers.{layer}.feed_forward.experts."
        want.quantize_("gate_up", raw[prefix + "gate_up_proj"])
        want.quantize_("down", raw[prefix + "down_proj"])
        for name, buf in want.named_buffers():
            assert torch.equal(getattr(got, name), buf), (layer, name)
    with safe_open(str(folder / "model-00002-of-00003.safetensors"), "pt") as f:
        assert DOWN not in f.keys() and GATE_UP in f.keys()  # the split this test is about

    ids = torch.tensor([[2, 17, 33, 101, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert logits.shape == (1, 5, 512) and torch.isfinite(logits).all()
        out = model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], ids)
