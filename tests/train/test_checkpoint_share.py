"""--checkpoint-layers: a share of the decoder layers recomputed in backward, the gradients unchanged."""

from __future__ import annotations

import copy

import torch
from tiny_models import tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.train.build import checkpoint_share


def test_a_share_of_layers_is_checkpointed_and_gradients_stay_the_same():
    model = tiny_llama()
    model.config.num_hidden_layers = 4
    model.model.layers.extend(copy.deepcopy(model.model.layers))
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), seed=0)
    reference = copy.deepcopy(model).train()
    model.train().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpoint_share(model, 0.5)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [False, True, False, True]
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    for m in (model, reference):
        m(ids, labels=ids, use_cache=False).loss.backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
