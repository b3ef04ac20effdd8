"""LoRA for nn.Linear and GPT-2's Conv1D.

    h = W0·x + b + s·B·(A·dropout(x))                      (LoRA)
    h = (m / ||W0 + s·B·A||) ⊙ (W0·x + s·B·A·x) + b          (DoRA, norm per output row; base.py)

GPT-2's Conv1D is a Linear whose weight is stored transposed (k x d), so only the matrix view
of its weight differs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LoraWrapper, add_scaled_product
from .per_row import linear_forward


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D, recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class Linear(LoraWrapper):
    """Wraps a frozen nn.Linear (or GPT-2 Conv1D, `fan_in_fan_out=True`)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.base_changed()

    def base_changed(self) -> None:
        self.fan_in_fan_out = is_gpt2_conv1d(self.base_layer)  # Conv1D stores W transposed (in x out)

    def weight_2d(self) -> Tensor:
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    @property
    def out_dim(self) -> int:  # from the layer's shape, not its weight (a quantized base would dequantize)
        return self.base_layer.nf if self.fan_in_fan_out else self.base_layer.out_features

    @property
    def in_dim(self) -> int:
        return self.base_layer.weight.shape[0] if self.fan_in_fan_out else self.base_layer.in_features

    def _low_rank(self, x: Tensor, name: str) -> Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        return F.linear(F.linear(x.to(a.dtype), a), b) * self.specs[name].scale  # s·(x·Aᵀ)·Bᵀ

    def _add_low_rank(self, out: Tensor, x: Tensor, name: str) -> Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        return add_scaled_product(out, F.linear(x.to(a.dtype), a), b, self.specs[name].scale)  # one addmm

    def _base_product(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_2d().to(x.dtype))

    def _forward_per_row(self, x: Tensor, out: Tensor) -> Tensor:
        return linear_forward(self, x, out)  # each row's factors gathered, two batched matmuls (per_row.py)
