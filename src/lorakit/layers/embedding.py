"""LoRA for nn.Embedding.

The table E (V x d) is seen as the matrix W = Eᵀ (d x V) acting on one-hot inputs, so
A is (r x V), B is (d x r) and row i of the table moves by s·(B·A[:, i])ᵀ:

    h = E[ids] + s · Aᵀ[ids] · Bᵀ                                                 (LoRA)
    h = g ⊙ (E[ids] + s · Aᵀ[ids] · Bᵀ),  g = m / ||Eᵀ + s·B·A|| per row of Eᵀ     (DoRA; base.py)

so DoRA's norm runs over the vocabulary, one per embedding dimension (PEFT's DoraEmbeddingLayer).

As in PEFT, A starts at zero and B random (a lookup of a random A would be too sparse a signal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AdapterSpec, LoraWrapper, add_scaled_product
from .per_row import embedding_forward


class Embedding(LoraWrapper):
    """Wraps a frozen nn.Embedding."""

    def weight_2d(self) -> Tensor:
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

    def _dropout(self, ids: Tensor, spec: AdapterSpec) -> Tensor:
        return ids  # token ids cannot be dropped out (PEFT applies no dropout to embeddings either)

    def _low_rank(self, ids: Tensor, name: str) -> Tensor:
        return F.linear(self._lookup(ids, self.lora_A[name].T), self.lora_B[name]) * self.specs[name].scale

    def _base_product(self, ids: Tensor) -> Tensor:
        return self.base_layer(ids)  # E[ids]: ids are never dropped, so this is the base output again

    def _add_low_rank(self, out: Tensor, ids: Tensor, name: str) -> Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        return add_scaled_product(out, self._lookup(ids, a.T), b, self.specs[name].scale)  # E[ids] + s·Aᵀ[ids]·Bᵀ

    def _forward_per_row(self, ids: Tensor, out: Tensor) -> Tensor:
        return embedding_forward(self, ids, out)  # each row's A columns looked up, one batched matmul (per_row.py)
