"""Int8Weight: 8-bit codes with one scale per output row (symmetric).

    W[n, k] = q[n, k] · s[n],    q ∈ {-127..127},  s[n] = max_k |W[n, k]| / 127

The layout torch's `_weight_int8pack_mm` reads as is, and a row of an embedding table is a row
of codes times one scale, so an embedding looks rows up without dequantizing the table. GGUF's
8-, 6- and 5-bit blocks (Q8_0, Q6_K, Q5_*) come here: each row is re-quantized onto this grid,
which adds at most s[n]/2 per weight (the row's largest value / 254).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

KERNEL_K_BLOCK = 16


class Int8Weight(nn.Module):
    """A frozen (N x K) weight in 8 bits; `dequantize()` gives it back in fp32."""

    kind = "int8"

    def __init__(self, codes: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("codes", codes)  # (N, K) int8
        self.register_buffer("scale", scale)  # (N,) fp32
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)  # what the kernel reads
        self.shape = tuple(codes.shape)

    @classmethod
    def quantize(cls, weight: Tensor) -> Int8Weight:
        weight = weight.detach().float()
        scale = weight.abs().amax(1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(weight / safe[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(codes, scale)

    row_block = 1

    def dequantize(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows [start, stop) of W in fp32."""
        return self.codes[start:stop].float().mul_(self.scale[start:stop, None])

    def rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` of W in fp32 (an embedding lookup), shape ids.shape + (K,)."""
        return self.codes[ids].float() * self.scale[ids].unsqueeze(-1)

    @property
    def has_kernel(self) -> bool:
        # torch 2.13's AVX-512 `_weight_int8pack_mm` reads K in blocks of 16: with K % 16 != 0 it returns
        # garbage or crashes (seen on an AVX-512 Xeon; the AVX2 path is fine), so such weights dequantize
        return self.shape[1] % KERNEL_K_BLOCK == 0

    def kernel_matmul(self, x: Tensor) -> Tensor:
        """x (M, K) @ Wᵀ with torch's int8 weight-only kernel: activations rounded to bf16, fp32 out."""
        if not self.has_kernel:
            return x.to(torch.bfloat16).float() @ self.dequantize().t()
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.codes, self.scale_bf16).float()

    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4

    def extra_repr(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}, int8 per output row"
