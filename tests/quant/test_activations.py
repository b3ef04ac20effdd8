"""Activations saved for backward in bf16: same forward, gradients within bf16 rounding, half the memory."""

from __future__ import annotations

import copy

import torch
from tiny_models import tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.quant import activations
from lorakit.quant.activations import store_activations


def adapted():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def test_bf16_saved_activations_keep_the_forward_and_round_the_gradients(monkeypatch):
    monkeypatch.setattr(activations, "MIN_ELEMENTS", 1)  # the tiny model's activations are all small
    model, reference = adapted(), None
    reference = copy.deepcopy(model)
    store_activations(model, torch.bfloat16)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    loss, expected = model(ids, labels=ids).loss, reference(ids, labels=ids).loss
    assert loss.item() == expected.item()  # the forward is fp32 either way
    loss.backward()
    expected.backward()
    for (name, param), other in zip(model.named_parameters(), reference.parameters()):
        if param.requires_grad:
            scale = other.grad.abs().max()
            assert (param.grad - other.grad).abs().max() <= 0.02 * scale, name


def test_saved_tensors_are_stored_once_in_half_the_bytes():
    store = activations._Store(torch.bfloat16)
    x = torch.randn(64, 512)
    first, again, view = store.pack(x), store.pack(x), store.pack(x.view(64, 8, 64))
    assert first is again and view is not first  # the same tensor once; another geometry separately
    assert first[0].dtype == torch.bfloat16 and first[0].untyped_storage().nbytes() == x.numel() * 2
    torch.testing.assert_close(store.unpack(first), x, rtol=2**-8, atol=0)
    param = torch.nn.Parameter(torch.randn(64, 512))
    assert store.pack(param) is param and store.pack(torch.ones(3)) is not None  # kept as they are


def test_evaluation_is_untouched():
    model = adapted()
    store_activations(model, torch.bfloat16)
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 5)))
    assert model.__dict__["_lorakit_saved_stack"] == []
