"""LoRA for nn.Linear and GPT-2's Conv1D.

    h = W0·x + b + s·B·(A·dropout(x))                      (LoRA)
    h = (m / ||W0 + s·B·A||) ⊙ (W0·x + s·B·A·x) + b          (DoRA, norm per output row)

GPT-2's Conv1D is a Linear whose weight is stored transposed (k x d), so only the matrix view
of its weight differs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import rows
from .base import LoraLayer, add_scaled_product


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D, recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class Linear(LoraLayer):
    """Wraps a frozen nn.Linear (or GPT-2 Conv1D, `fan_in_fan_out=True`)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.base_changed()

    def base_changed(self) -> None:
        self.fan_in_fan_out = is_gpt2_conv1d(self.base_layer)  # Conv1D stores W transposed (in x out)

    def _weight_2d(self) -> Tensor:
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    @property
    def out_dim(self) -> int:  # from the layer's shape, not its weight (a quantized base would dequantize)
        return self.base_layer.nf if self.fan_in_fan_out else self.base_layer.out_features

    @property
    def in_dim(self) -> int:
        return self.base_layer.weight.shape[0] if self.fan_in_fan_out else self.base_layer.in_features

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.row_adapters is not None:
            return self._forward_rows(x, out)
        name = self.live_adapter()
        if name is None:
            return out
        spec, a, b = self.specs[name], self.lora_A[name], self.lora_B[name]
        if spec.dropout:
            x = F.dropout(x, spec.dropout, self.training)
        if spec.use_dora:
            return self._forward_dora(x, out, name)
        return add_scaled_product(out, F.linear(x.to(a.dtype), a), b, spec.scale)  # out + s·(x·Aᵀ)·Bᵀ

    def _base_without_bias(self, x: Tensor, out: Tensor, recompute: bool) -> Tensor:
        if recompute:  # dropout changed x, so W0·x must be recomputed on the dropped input
            return F.linear(x, self._weight_2d().to(x.dtype))
        bias = getattr(self.base_layer, "bias", None)
        return out if bias is None else out - bias

    def _forward_dora(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        spec, a, b = self.specs[name], self.lora_A[name], self.lora_B[name]
        scale = self.dora_scale(name)  # m / ||W0 + s·B·A||
        base = self._base_without_bias(x, out, recompute=bool(spec.dropout) and self.training)
        lora = F.linear(F.linear(x.to(a.dtype), a), b) * spec.scale
        return out + ((scale - 1) * base + scale * lora).to(out.dtype)

    def _forward_rows(self, x: Tensor, out: Tensor) -> Tensor:
        """Each row b uses its own adapter: gather its A and B, then two batched matmuls (rows.py)."""
        return rows.linear_rows(self, x, out)
