"""LoRA for nn.Conv1d / Conv2d / Conv3d.

A is a convolution with the base layer's kernel, stride, padding and dilation but r output
channels; B is a 1x1 convolution from r to d channels. Flattening the kernel per output
channel makes this the usual product: W (d x k·∏kernel) gets ΔW = s·B·A.

    h = conv(x, W0) + b + s · conv₁ₓ₁(conv(dropout(x), A), B)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError
from . import rows
from .base import LoraLayer

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Conv(LoraLayer):
    """Wraps a frozen nn.Conv1d, nn.Conv2d or nn.Conv3d (groups=1)."""

    supports_dora = False

    def __init__(self, base_layer: nn.Module):
        if base_layer.groups != 1:
            raise LorakitError(
                f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported; exclude this module"
            )
        super().__init__(base_layer)
        self.kernel_dims = base_layer.weight.dim() - 2

    def _weight_2d(self) -> Tensor:
        weight = self.base_layer.weight
        return weight.view(weight.shape[0], -1)

    def _a_shape(self, r: int) -> tuple[int, ...]:
        return (r, *self.base_layer.weight.shape[1:])

    def _b_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_dim, r) + (1,) * self.kernel_dims

    def _low_rank(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        xa = self.base_layer._conv_forward(x.to(a.dtype), a, None)  # same stride / padding / dilation as W0
        return _CONV_FN[self.kernel_dims](xa, b)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.row_adapters is not None:
            return self._forward_rows(x, out)
        name = self.live_adapter()
        if name is None:
            return out
        spec = self.specs[name]
        if spec.dropout:
            x = F.dropout(x, spec.dropout, self.training)
        return out + (spec.scale * self._low_rank(x, self.lora_A[name], self.lora_B[name])).to(out.dtype)

    def _forward_rows(self, x: Tensor, out: Tensor) -> Tensor:
        """Convolutions have no batched-weight kernel: the rows are grouped by adapter (rows.py)."""
        return rows.conv_rows(self, x, out)
