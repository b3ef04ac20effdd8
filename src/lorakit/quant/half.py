"""HalfWeight: a frozen weight stored in bf16 or fp16, computed in whatever the CPU does fastest.

    W = float(W16)

Storage is not compute: on a CPU without native bf16 arithmetic (AVX2 only) a bf16 GEMM runs
~6x slower than fp32, so the weight is upcast per layer and multiplied in fp32 there; where
bf16 is native (AVX-512 BF16, AMX, GPUs) the 16-bit GEMM runs directly (compute.py decides).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HalfWeight(nn.Module):
    has_kernel = True

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.shape = tuple(weight.shape)
        self.kind = "bf16" if weight.dtype == torch.bfloat16 else "fp16"

    @classmethod
    def quantize(cls, weight: Tensor, dtype: torch.dtype = torch.bfloat16) -> HalfWeight:
        return cls(weight.detach().to(dtype).contiguous())

    row_block = 1

    def dequantize(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows [start, stop) of W in fp32."""
        return self.weight[start:stop].float()

    def rows(self, ids: Tensor) -> Tensor:
        return self.weight[ids].float()

    def kernel_matmul(self, x: Tensor) -> Tensor:
        """x @ Wᵀ as a 16-bit GEMM (fp32 out)."""
        return F.linear(x.to(self.weight.dtype), self.weight).float()

    def nbytes(self) -> int:
        return self.weight.numel() * 2

    def extra_repr(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}, {self.kind} storage"
