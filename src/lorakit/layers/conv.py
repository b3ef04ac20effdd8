"""LoRA for nn.Conv1d / Conv2d / Conv3d.

A is a convolution with the base layer's kernel, stride, padding and dilation but r output
channels; B is a 1x1 convolution from r to d channels. Flattening the kernel per output
channel makes this the usual product: W (d x k·∏kernel) gets ΔW = s·B·A.

    h = conv(x, W0) + b + s · conv₁ₓ₁(conv(dropout(x), A), B)                       (LoRA)
    h = g ⊙ (conv(x, W0) + s · conv₁ₓ₁(conv(x, A), B)) + b,  g = m / ||W0 + s·B·A||  (DoRA; base.py)

DoRA's norm is taken per output channel over c_in x kernel, and m is stored as PEFT stores it,
(1, d, 1, ...), so that it broadcasts over the (N, d, *spatial) output.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError
from .base import LoraWrapper
from .per_row import conv_forward

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Conv(LoraWrapper):
    """Wraps a frozen nn.Conv1d, nn.Conv2d or nn.Conv3d (groups=1)."""

    def __init__(self, base_layer: nn.Module):
        if base_layer.groups != 1:
            raise LorakitError(
                f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported; exclude this module"
            )
        super().__init__(base_layer)
        self.kernel_dims = base_layer.weight.dim() - 2

    def weight_2d(self) -> Tensor:
        weight = self.base_layer.weight
        return weight.view(weight.shape[0], -1)

    def _a_shape(self, r: int) -> tuple[int, ...]:
        return (r, *self.base_layer.weight.shape[1:])

    def _b_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_dim, r) + (1,) * self.kernel_dims

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_dim) + (1,) * self.kernel_dims  # PEFT's layout: m broadcasts over (N, d, *spatial)

    def _per_channel(self, v: Tensor) -> Tensor:
        return v.view(-1, *(1,) * self.kernel_dims)  # channels are dim 1 of (N, d, *spatial)

    def _low_rank(self, x: Tensor, name: str) -> Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        xa = self.base_layer._conv_forward(x.to(a.dtype), a, None)  # same stride / padding / dilation as W0
        return self.specs[name].scale * _CONV_FN[self.kernel_dims](xa, b)

    def _base_product(self, x: Tensor) -> Tensor:
        return self.base_layer._conv_forward(x, self.base_layer.weight.to(x.dtype), None)

    def _forward_per_row(self, x: Tensor, out: Tensor) -> Tensor:
        return conv_forward(self, x, out)  # no batched-weight conv kernel: rows grouped by adapter (per_row.py)
