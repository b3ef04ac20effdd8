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
