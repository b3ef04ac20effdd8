"""QuantLinear: a frozen nn.Linear whose weight is stored quantized (int4, int8) or in 16 bits.

    y = x·Wᵀ + b,    W = storage.dequantize()        (never kept: rebuilt per layer, per use)

Forward runs the storage's kernel for a few rows or dequantizes the layer and runs an fp32
GEMM (compute.py chooses). W is frozen, so backward is only the input's gradient,
dx = dy·W, with W dequantized again: no fp32 copy of the weight outlives the layer's turn,
which is what keeps a quantized base small while training. The bias, if any, stays an fp32
Parameter (LoRA's bias="lora_only" may train it).

It subclasses nn.Linear so everything that looks for Linear layers (target matching,
"all-linear", LoRA wrapping) treats it as one; `weight` is a read-only property that
dequantizes, for code that reads it (DoRA's norm, shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compute import use_kernel

CHUNK = 1 << 21  # dequantize at most this many weights at a time (8 MB of fp32): a 50k-token head never whole


def _row_chunks(storage: nn.Module) -> list[tuple[int, int]]:
    rows, cols = storage.shape
    step = max(1, CHUNK // max(cols, 1) // storage.row_block) * storage.row_block
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class _FrozenMatmul(torch.autograd.Function):
    """x·Wᵀ for a frozen quantized W: the gradient reaches x only."""

    @staticmethod
    def forward(ctx, x: Tensor, storage: nn.Module) -> Tensor:
        ctx.storage = storage
        return _matmul(x, storage)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad, storage = grad.to(torch.float32), ctx.storage
        chunks = _row_chunks(storage)
        if len(chunks) == 1:
            return grad @ storage.dequantize().to(grad.device), None
        dx = grad.new_zeros((grad.shape[0], storage.shape[1]))
        for start, stop in chunks:  # dx = Σ_chunks dy[:, chunk]·W[chunk]
            dx.addmm_(grad[:, start:stop], storage.dequantize(start, stop).to(grad.device))
        return dx, None


def _matmul(x: Tensor, storage: nn.Module) -> Tensor:
    if use_kernel(storage, x.shape[0], x.device):
        return storage.kernel_matmul(x)
    chunks = _row_chunks(storage)
    if len(chunks) == 1:
        return F.linear(x, storage.dequantize())
    out = x.new_empty((x.shape[0], storage.shape[0]))
    for start, stop in chunks:
        torch.mm(x, storage.dequantize(start, stop).t(), out=out[:, start:stop])
    return out


class QuantLinear(nn.Linear):
    """y = x·Wᵀ + b with W held by `storage` (Int4Weight, Int8Weight or HalfWeight)."""

    lorakit_quantized = True

    def __init__(self, storage: nn.Module, bias: nn.Parameter | None = None, from_conv1d: bool = False):
        nn.Module.__init__(self)
        self.out_features, self.in_features = storage.shape
        self.storage = storage
        self.bias = bias
        self.from_conv1d = from_conv1d  # stood in for a GPT-2 Conv1D (same math, weight stored transposed)

    @property
    def weight(self) -> Tensor:
        return self.storage.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        out = _FrozenMatmul.apply(flat, self.storage) if flat.requires_grad else _matmul(flat, self.storage)
        if self.bias is not None:
            out = out + self.bias
        out = out.view(*x.shape[:-1], self.out_features)
        return out if x.dtype == torch.float32 or not x.is_floating_point() else out.to(x.dtype)

    def dequantized(self) -> nn.Module:
        """An ordinary fp32 layer with the same weight (and the same bias Parameter)."""
        weight = nn.Parameter(self.storage.dequantize(), requires_grad=False)
        if self.from_conv1d:
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(self.out_features, self.in_features)
            layer.weight = nn.Parameter(weight.data.t().contiguous(), requires_grad=False)
            layer.bias = self.bias if self.bias is not None else nn.Parameter(torch.zeros(self.out_features))
            return layer
        layer = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        layer.weight = weight
        layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
