"""LoRA for nn.Embedding.

The table E (V x d) is seen as the matrix W = Eᵀ (d x V) acting on one-hot inputs, so
A is (r x V), B is (d x r) and row i of the table moves by s·(B·A[:, i])ᵀ:

    h = E[ids] + s · Aᵀ[ids] · Bᵀ

As in PEFT, A starts at zero and B random (a lookup of a random A would be too sparse a signal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import rows
from .base import AdapterSpec, LoraLayer, add_scaled_product


class Embedding(LoraLayer):
    """Wraps a frozen nn.Embedding."""

    supports_dora = False

    def _weight_2d(self) -> Tensor:
        return self.base_layer.weight.T

    def _init_pair(self, a: Tensor, b: Tensor, spec: AdapterSpec, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            a.zero_()
            b.normal_(0.0, 1.0, generator=generator)

    def _lookup(self, ids: Tensor, table: Tensor) -> Tensor:
        base = self.base_layer
        return F.embedding(
            ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def forward(self, ids: Tensor) -> Tensor:
        out = self.base_layer(ids)
        if self.row_adapters is not None:
            return self._forward_rows(ids, out)
        name = self.live_adapter()
        if name is None:
            return out
        a, b = self.lora_A[name], self.lora_B[name]
        return add_scaled_product(out, self._lookup(ids, a.T), b, self.specs[name].scale)  # E[ids] + s·Aᵀ[ids]·Bᵀ

    def _forward_rows(self, ids: Tensor, out: Tensor) -> Tensor:
        return rows.embedding_rows(self, ids, out)
