"""Switching, disabling, deleting, merging and unloading adapters on whole models."""

import copy

import pytest
import torch
from tiny_models import conv_inputs, conv_net, randomize_adapter, tiny_gpt2, tiny_llama, token_ids

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.layers import LoraWrapper, SavedModule


def two_adapter_llama():
    model = tiny_llama()
    base = copy.deepcopy(model)
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="sql")
    lorakit.inject(model, LoraConfig(r=2, target_modules="all-linear", use_dora=True), name="poet")
    randomize_adapter(model, "sql", seed=1)
    randomize_adapter(model, "poet", seed=2)
    return model, base


def test_set_adapter_switches_and_none_is_base():
    model, base = two_adapter_llama()
    ids = token_ids()
    outs = {}
    for name in ("sql", "poet", None):
        lorakit.set_adapter(model, name)
        outs[name] = model(ids).logits
    torch.testing.assert_close(outs[None], base(ids).logits, atol=1e-6, rtol=0)
    assert (outs["sql"] - outs["poet"]).abs().max() > 1e-3
    with pytest.raises(LorakitError, match="no adapter named 'nope'; adapters on this model: poet, sql"):
        lorakit.set_adapter(model, "nope")


def test_disabled_context_gives_base_then_restores():
    model, base = two_adapter_llama()
    lorakit.set_adapter(model, "sql")
    ids = token_ids()
    with_adapter = model(ids).logits
    with lorakit.disabled(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=0)
    assert lorakit.active_adapter(model) == "sql"
    torch.testing.assert_close(model(ids).logits, with_adapter)


@pytest.mark.parametrize("name", ["sql", "poet"])
def test_model_merge_equals_unmerged_and_unmerge_restores(name):
    model, base = two_adapter_llama()
    lorakit.set_adapter(model, name)
    ids = token_ids()
    before = model(ids).logits
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    lorakit.merge(model)
    lorakit.merge(model)
    assert lorakit.merged_adapter(model) == name
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    with pytest.raises(LorakitError, match="unmerge"):
        lorakit.set_adapter(model, "sql" if name == "poet" else "poet")
    with lorakit.disabled(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)
    assert lorakit.merged_adapter(model) == name
    lorakit.unmerge(model)
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        if n in w0:
            assert (p - w0[n]).abs().max() <= 1e-6, n


def test_train_and_eval_never_merge():
    model, _ = two_adapter_llama()
    model.eval()
    model.train()
    model.eval()
    assert lorakit.merged_adapter(model) is None


def test_merge_and_unload_gives_plain_model_with_same_outputs():
    model = tiny_gpt2()
    lorakit.inject(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], modules_to_save=["lm_head"]))
    randomize_adapter(model, "default")
    with torch.no_grad():
        model.lm_head.copies["default"].weight.mul_(1.1)
    ids = token_ids()
    before = model(ids).logits
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, (LoraWrapper, SavedModule)) for m in plain.modules())
    assert "lorakit_configs" not in plain.__dict__
    torch.testing.assert_close(plain(ids).logits, before, atol=1e-5, rtol=0)
    fresh = tiny_gpt2()
    assert set(plain.state_dict()) == set(fresh.state_dict())


def test_delete_adapter_restores_original_structure():
    model, base = two_adapter_llama()
    lorakit.delete_adapter(model, "poet")
    assert lorakit.list_adapters(model) == ["sql"]
    lorakit.delete_adapter(model, "sql")
    assert not any(isinstance(m, LoraWrapper) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(model(token_ids()).logits, base(token_ids()).logits)
    assert lorakit.active_adapter(model) is None


def test_merge_refuses_tied_embedding():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    lorakit.inject(model, LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(LorakitError, match="tied"):
        lorakit.merge(model)


def test_merge_without_active_adapter_is_an_error():
    model, _ = two_adapter_llama()
    lorakit.set_adapter(model, None)
    with pytest.raises(LorakitError, match="no active adapter"):
        lorakit.merge(model)


def test_conv_model_merge_round_trip():
    model = conv_net()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["embed", "conv1d", "conv2d", "conv3d", "head"]))
    randomize_adapter(model, "default")
    inputs = conv_inputs()
    before = model(*inputs)
    lorakit.merge(model)
    torch.testing.assert_close(model(*inputs), before, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    torch.testing.assert_close(model(*inputs), before, atol=1e-5, rtol=0)


def test_bf16_base_halves_base_memory_and_keeps_adapters_fp32():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    lorakit.inject(reference, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0, base_dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.state_dict().items()}
    assert dtypes["model.layers.0.self_attn.q_proj.base_layer.storage.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.mlp.up_proj.storage.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.self_attn.q_proj.lora_A.default"] == torch.float32
    assert dtypes["model.norm.weight"] == torch.float32
    ids = token_ids(2, 12)
    losses = {}
    for label, m in (("fp32", reference), ("bf16", model)):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(5):
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses[label] = loss.item()
        assert all(p.grad is None for n, p in m.named_parameters() if "base_layer" in n)
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.01
