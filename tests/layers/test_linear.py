"""Linear / GPT-2 Conv1D LoRA layers against a plain matmul reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import AdapterSpec, Linear


def make_layer(d=12, k=10, r=4, scale=2.0, use_dora=False, init="kaiming", dropout=0.0, seed=0, conv1d=False):
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(d, k)
        nn.init.normal_(base.weight)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(k, d)
    base.requires_grad_(False)
    layer = Linear(base)
    layer.add_adapter("a", AdapterSpec(r=r, scale=scale, use_dora=use_dora, init=init, dropout=dropout))
    layer.active = "a"
    return layer


def randomize(layer, name="a", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A[name].copy_(0.3 * torch.randn(layer.lora_A[name].shape, generator=g))
        layer.lora_B[name].copy_(0.3 * torch.randn(layer.lora_B[name].shape, generator=g))


def dense_weight(layer):
    """W0 as a plain (d x k) matrix, computed independently of the layer's own view."""
    w = layer.base_layer.weight.detach().clone()
    return w.T if layer.fan_in_fan_out else w


@pytest.mark.parametrize("conv1d", [False, True])
def test_zero_b_gives_exactly_the_base_output(conv1d):
    layer = make_layer(conv1d=conv1d)
    x = torch.randn(3, 5, 10)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("conv1d", [False, True])
def test_forward_matches_dense_formula(conv1d):
    layer = make_layer(conv1d=conv1d)
    randomize(layer)
    x = torch.randn(3, 5, 10)
    a, b = layer.lora_A["a"].detach(), layer.lora_B["a"].detach()
    w = dense_weight(layer) + 2.0 * b @ a
    expected = x @ w.T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores_w0(conv1d, use_dora):
    layer = make_layer(conv1d=conv1d, use_dora=use_dora)
    randomize(layer)
    x = torch.randn(4, 10)
    w0 = layer.base_layer.weight.detach().clone()
    before = layer(x)
    layer.merge()
    layer.merge()  # idempotent
    assert layer.merged == "a"
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    layer.unmerge()
    layer.unmerge()
    assert (layer.base_layer.weight - w0).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)


def test_dora_matches_its_definition():
    layer = make_layer(use_dora=True)
    randomize(layer)
    with torch.no_grad():
        layer.lora_magnitude["a"].mul_(torch.linspace(0.5, 1.5, 12))
    x = torch.randn(6, 10)
    w = dense_weight(layer) + 2.0 * layer.lora_B["a"].detach() @ layer.lora_A["a"].detach()
    m = layer.lora_magnitude["a"].detach()
    w_dora = m[:, None] * w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ w_dora.T + layer.base_layer.bias, atol=1e-5, rtol=1e-5)


def test_dora_starts_at_the_base_model():
    layer = make_layer(use_dora=True)
    x = torch.randn(6, 10)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=1e-6, rtol=0)


def test_only_adapter_gets_gradients_and_base_never_changes():
    layer = make_layer(use_dora=True)
    w0 = layer.base_layer.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = layer(torch.randn(8, 10)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert layer.base_layer.weight.grad is None
    assert torch.equal(layer.base_layer.weight, w0)
    assert layer.lora_B["a"].abs().sum() > 0


def test_dropout_only_touches_the_low_rank_path():
    layer = make_layer(dropout=0.5)
    randomize(layer)
    x = torch.randn(64, 10)
    layer.eval()
    eval_out = layer(x)
    layer.train()
    torch.manual_seed(3)
    train_out = layer(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, True)
    expected = layer.base_layer(x) + 2.0 * dropped @ layer.lora_A["a"].T @ layer.lora_B["a"].T
    torch.testing.assert_close(train_out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(train_out, eval_out)


def test_gaussian_init_has_std_one_over_r():
    layer = make_layer(d=256, k=256, r=4, init="gaussian")
    assert abs(layer.lora_A["a"].std().item() - 0.25) < 0.02
    assert torch.count_nonzero(layer.lora_B["a"]) == 0


def test_kaiming_init_bounds():
    layer = make_layer(d=64, k=100, r=8)
    assert layer.lora_A["a"].abs().max() <= 1 / 100**0.5
    assert layer.lora_A["a"].std() > 0.03


def test_pissa_starts_at_base_and_factors_are_top_singular_part():
    layer = make_layer(d=16, k=12, r=3, scale=0.5, init="pissa")
    w0 = layer.base_layer.weight.detach().clone()  # residual
    a, b = layer.lora_A["a"].detach(), layer.lora_B["a"].detach()
    original = w0 + 0.5 * b @ a
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), x @ original.T + layer.base_layer.bias, atol=1e-5, rtol=1e-5)
    u, s, vh = torch.linalg.svd(original)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(0.5 * b @ a, best, atol=1e-4, rtol=1e-4)
    layer.delete_adapter("a")
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-5, rtol=0)


def test_adapters_of_different_ranks_coexist_and_switch():
    layer = make_layer(r=2)
    layer.add_adapter("b", AdapterSpec(r=5, scale=1.0))
    randomize(layer, "a", 1)
    randomize(layer, "b", 2)
    x = torch.randn(3, 10)
    outs = {}
    for name in ("a", "b", None):
        layer.active = name
        outs[name] = layer(x)
    w = layer.base_layer.weight.detach()
    torch.testing.assert_close(outs["b"], x @ (w + layer.lora_B["b"] @ layer.lora_A["b"]).T + layer.base_layer.bias)
    torch.testing.assert_close(outs[None], layer.base_layer(x))
    assert not torch.allclose(outs["a"], outs["b"])
