"""Conv LoRA against F.convNd with the dense kernel W + s·(B·A) reshaped."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LorakitError
from lorakit.layers import AdapterSpec, Conv

CASES = [
    (nn.Conv1d(4, 6, 3, padding=1), F.conv1d, (2, 4, 9)),
    (nn.Conv2d(3, 5, 3, stride=2, padding=1), F.conv2d, (2, 3, 8, 8)),
    (nn.Conv2d(3, 5, 1), F.conv2d, (2, 3, 4, 4)),
    (nn.Conv3d(2, 4, 2, dilation=1), F.conv3d, (2, 2, 4, 4, 4)),
]


@pytest.mark.parametrize("base, conv_fn, shape", CASES)
def test_forward_merge_unmerge_against_dense_kernel(base, conv_fn, shape):
    torch.manual_seed(0)
    base.requires_grad_(False)
    layer = Conv(base)
    layer.add_adapter("a", AdapterSpec(r=2, scale=0.75))
    layer.active = "a"
    x = torch.randn(shape)
    assert torch.equal(layer(x), base(x))  # B = 0
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    w0 = base.weight.detach().clone()
    a2d = layer.lora_A["a"].detach().reshape(2, -1)
    b2d = layer.lora_B["a"].detach().reshape(-1, 2)
    kernel = w0 + 0.75 * (b2d @ a2d).view(w0.shape)
    expected = conv_fn(x, kernel, base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert (base.weight - w0).abs().max() <= 1e-6


def test_grouped_conv_is_refused_clearly():
    with pytest.raises(LorakitError, match="groups=2"):
        Conv(nn.Conv2d(4, 4, 3, groups=2))


def dora_layer(base, dropout=0.0):
    torch.manual_seed(0)
    layer = Conv(base.requires_grad_(False))
    layer.add_adapter("a", AdapterSpec(r=2, scale=0.75, use_dora=True, dropout=dropout))
    layer.active = "a"
    with torch.no_grad():
        layer.lora_B["a"].normal_()
        layer.lora_magnitude["a"].mul_(torch.linspace(0.5, 1.5, base.out_channels).view(layer.magnitude_shape()))
    return layer


def dora_kernel(layer):
    """m · (W0 + s·B·A) / ||W0 + s·B·A||, the norm over everything but the output channel (dense reference)."""
    w0 = layer.base_layer.weight.detach()
    a2d, b2d = layer.lora_A["a"].detach().reshape(2, -1), layer.lora_B["a"].detach().reshape(-1, 2)
    w = w0 + 0.75 * (b2d @ a2d).view(w0.shape)
    norm = w.flatten(1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
    return layer.lora_magnitude["a"].detach().reshape(norm.shape) * w / norm


@pytest.mark.parametrize("base, conv_fn, shape", CASES)
def test_dora_against_the_dense_rescaled_kernel_and_exact_unmerge(base, conv_fn, shape):
    layer = dora_layer(base)
    assert tuple(layer.lora_magnitude["a"].shape) == (1, base.out_channels) + (1,) * (len(shape) - 2)
    x = torch.randn(shape)
    expected = conv_fn(x, dora_kernel(layer), base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    w0 = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert (base.weight - w0).abs().max() <= 1e-6


def test_dora_starts_at_the_base_conv():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, 3, padding=1).requires_grad_(False)
    layer = Conv(base)
    layer.add_adapter("a", AdapterSpec(r=2, scale=1.0, use_dora=True))
    layer.active = "a"
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=0)


def test_dora_dropout_recomputes_the_base_term_on_the_dropped_input():
    """out + (g-1)·conv(drop(x), W0) + g·s·conv(conv(drop(x), A), B), the base output itself undropped."""
    base, conv_fn, shape = CASES[1]
    layer = dora_layer(base, dropout=0.5).train()
    x = torch.randn(shape)
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, True)
    w0 = base.weight.detach()
    a2d, b2d = layer.lora_A["a"].detach().reshape(2, -1), layer.lora_B["a"].detach().reshape(-1, 2)
    kernel = w0 + 0.75 * (b2d @ a2d).view(w0.shape)
    g = (layer.lora_magnitude["a"].detach().flatten() / kernel.flatten(1).norm(dim=1)).view(1, -1, 1, 1)
    on_dropped = conv_fn(dropped, kernel, None, base.stride, base.padding, base.dilation)
    plain = conv_fn(dropped, w0, None, base.stride, base.padding, base.dilation)
    expected = base(x) - plain + g * on_dropped
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
