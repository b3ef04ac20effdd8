"""The per-row interface a layer owns: its slot stack, its adapters' keys, and the row index one batch shares."""

import pytest
import torch
from torch import nn

from lorakit import LorakitError
from lorakit.layers import AdapterSpec, Linear
from lorakit.layers.per_row import PerRow


def layer_with(names, d=6, k=5, seed=0):
    torch.manual_seed(seed)
    layer = Linear(nn.Linear(k, d).requires_grad_(False))
    for i, name in enumerate(names):
        layer.add_adapter(name, AdapterSpec(r=1 + i, scale=0.5 * (i + 1)))
        with torch.no_grad():
            layer.lora_B[name].normal_()
        layer.lora_A[name].requires_grad_(False)
        layer.lora_B[name].requires_grad_(False)
    return layer


def test_rows_equal_a_plain_matmul_per_row_and_layers_share_one_index():
    first, second = layer_with(["a", "b"]), layer_with(["a", "b"], seed=1)
    batch = PerRow(["b", None, "a", "b"])
    x = torch.randn(4, 3, 5)
    outs = []
    for layer in (first, second):
        layer.per_row = batch
        outs.append(layer(x))
    for layer, out in zip((first, second), outs):
        for row, name in enumerate(batch.names):
            w = layer.weight_2d() + (0 if name is None else layer.delta_weight(name))
            torch.testing.assert_close(out[row], x[row] @ w.T + layer.base_layer.bias, atol=1e-5, rtol=1e-5)
    assert len(batch._indices) == 1  # both layers hold the same adapters: one index, built once
    assert len(PerRow(batch.names)._indices) == 0  # a new PerRow starts empty: no module-global state


def test_stack_recopies_only_changed_adapters_and_reserve_grows_it_once():
    layer = layer_with(["a", "b"])
    slot = dict(layer.stacked()[0])
    key = layer.adapter_keys(["a"])
    with torch.no_grad():
        layer.lora_B["a"].mul_(2.0)  # an in-place edit moves the version
    assert layer.adapter_keys(["a"]) != key
    _, _, b_t, _ = layer.stacked(["a"])
    torch.testing.assert_close(b_t[slot["a"], :1], 0.5 * layer.lora_B["a"].detach().t())
    layer.reserve_slots(20)
    assert layer.stacked()[1].shape[0] > 20 and layer.stacked()[0] == slot  # grown (doubling), slots kept


def test_a_batch_of_the_wrong_size_or_a_merged_layer_is_refused():
    layer = layer_with(["a"])
    layer.per_row = PerRow(["a", None])
    with pytest.raises(LorakitError, match="batch has 3 rows"):
        layer(torch.randn(3, 5))
    layer.per_row = None
    layer.merge("a")
    layer.per_row = PerRow(["a"])
    with pytest.raises(LorakitError, match="merged.*unmerge"):
        layer(torch.randn(1, 5))
