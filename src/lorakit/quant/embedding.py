"""QuantEmbedding: a frozen nn.Embedding whose table is stored in int8 (or 16 bits).

    e(t) = E[t] = q[t] · s[t]        (only the looked-up rows are dequantized)

The table can be shared with a tied output head (a QuantLinear over the same storage), as the
fp32 model shares one Parameter between them. Output rows are fp32, so the residual stream
stays fp32.
"""

from __future__ import annotations

from torch import Tensor, nn


class QuantEmbedding(nn.Embedding):
    lorakit_quantized = True

    def __init__(self, storage: nn.Module, padding_idx: int | None = None):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = storage.shape
        self.storage = storage
        self.padding_idx = padding_idx
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False

    @property
    def weight(self) -> Tensor:
        return self.storage.dequantize()

    def forward(self, ids: Tensor) -> Tensor:
        return self.storage.rows(ids)

    def dequantized(self) -> nn.Module:
        layer = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device="meta")
        layer.weight = nn.Parameter(self.storage.dequantize(), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
