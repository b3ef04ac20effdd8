"""Embedding LoRA against F.embedding on the dense table E + s·(B·A)ᵀ."""

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import AdapterSpec, Embedding


def make_layer():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0).requires_grad_(False)
    layer = Embedding(base)
    layer.add_adapter("a", AdapterSpec(r=3, scale=1.5))
    layer.active = "a"
    return layer


def test_starts_at_base_a_zero_b_random():
    layer = make_layer()
    ids = torch.randint(0, 20, (2, 5))
    assert torch.equal(layer(ids), layer.base_layer(ids))
    assert torch.count_nonzero(layer.lora_A["a"]) == 0 and torch.count_nonzero(layer.lora_B["a"]) > 0


def test_forward_merge_unmerge_against_dense_table():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_A["a"].normal_()
    ids = torch.randint(0, 20, (2, 5))
    e0 = layer.base_layer.weight.detach().clone()
    table = e0 + 1.5 * (layer.lora_B["a"] @ layer.lora_A["a"]).T.detach()
    torch.testing.assert_close(layer(ids), F.embedding(ids, table), atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(ids), F.embedding(ids, table), atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert (layer.base_layer.weight - e0).abs().max() <= 1e-6


def test_dora_against_the_dense_rescaled_table_and_exact_unmerge():
    """g = m / ||Eᵀ + s·B·A|| per embedding dimension (the norm runs over the vocabulary), as PEFT."""
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0).requires_grad_(False)
    layer = Embedding(base)
    layer.add_adapter("a", AdapterSpec(r=3, scale=1.5, use_dora=True))
    layer.active = "a"
    ids = torch.randint(0, 20, (2, 5))
    assert torch.equal(layer(ids), base(ids))  # A = 0 and m = ||E||: exactly the base
    assert tuple(layer.lora_magnitude["a"].shape) == (6,)
    with torch.no_grad():
        layer.lora_A["a"].normal_()
        layer.lora_magnitude["a"].mul_(torch.linspace(0.5, 1.5, 6))
    e0 = base.weight.detach().clone()
    table = e0 + 1.5 * (layer.lora_B["a"] @ layer.lora_A["a"]).T.detach()
    dora_table = layer.lora_magnitude["a"].detach() * table / table.norm(dim=0)
    torch.testing.assert_close(layer(ids), F.embedding(ids, dora_table), atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(ids), F.embedding(ids, dora_table), atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert (base.weight - e0).abs().max() <= 1e-6
