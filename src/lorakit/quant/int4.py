"""Int4Weight: 4-bit codes with a scale and a zero point per group of 32 inputs.

    W[n, k] = (q[n, k] - 8) · s[n, g] + z[n, g],    q ∈ {0..15},  g = k // 32

This is GGUF's Q4_1 grid (asymmetric, blocks of 32) written the way torch's CPU kernel
`_weight_int4pack_mm_for_cpu` reads it, so GGUF Q4_0 (z = 0), Q4_1 (z = m + 8d) and Q4_K
(s = d·sc, z = 8·d·sc - dmin·m) blocks map onto it code for code, and a float weight is
quantized by round-to-nearest between each group's min and max (llama.cpp's Q4_1 rule).

Why not NF4: NF4's 16 levels are normal quantiles, which fit Gaussian weights a little better
at the same block size (QLoRA), but no CPU kernel in torch reads NF4 (every use would be a
table lookup and a dequantized copy), it is not a GGUF type (so GGUF files would have to be
re-quantized, adding error), and with blocks of 32 and a zero point the asymmetric grid already
tracks each group's range closely (`benchmarks/quant_base.py` measures both on SmolLM2's weights).

Storage is the kernel's own: the codes packed two to a byte in the row-blocked order torch's
`_convert_weight_to_int4pack_for_cpu` writes (it depends on the CPU build: the low nibble holds
row b and the high nibble row b + B/2 of each block of B = 32 (AVX2) or 64 (AVX-512) rows; pairs
of rows elsewhere), and one (K/32, N, 2) bf16 tensor of (s, z). `codes_t` undoes the layout with
tensor ops for the per-layer dequantization; which layout this build writes is checked once on a
probe, and if none matches the codes are packed plainly (two inputs per byte) with no kernel.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

GROUP = 32


def supports(out_features: int, in_features: int) -> bool:
    """The kernel's shape rules: whole groups of 32 inputs, outputs in blocks of 16."""
    return in_features % GROUP == 0 and out_features % 16 == 0 and in_features > 0 and out_features > 0


def _codes_t_blocked(packed: Tensor, n: int, k: int, block: int, split: bool) -> Tensor:
    """(k, n) codes from torch's CPU int4 layout: full blocks of `block` rows, then a tail in pairs."""
    flat = packed.reshape(-1)
    parts = []
    full = n // block * block
    if full:
        bytes_ = flat[: full * k // 2].view(n // block, k, block // 2)
        low, high = bytes_ & 15, bytes_ >> 4
        if split:  # byte b holds rows b and b + block/2
            codes = torch.cat([low, high], 2)
        else:  # byte b holds rows 2b and 2b + 1
            codes = torch.stack([low, high], 3).reshape(n // block, k, block)
        parts.append(codes.permute(1, 0, 2).reshape(k, full))
    if n > full:
        tail = flat[full * k // 2 :].view(k, (n - full) // 2)
        parts.append(torch.stack([tail & 15, tail >> 4], 2).reshape(k, n - full))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _pack_plain(codes: Tensor) -> Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _codes_t_plain(packed: Tensor, n: int, k: int) -> Tensor:
    return torch.stack([packed & 15, packed >> 4], 2).reshape(n, k).t().contiguous()


@functools.cache
def kernel_layout() -> tuple[int, bool] | None:
    """(rows per block, split) of the layout this torch build's int4 packer writes; None if unknown."""
    try:
        probe = torch.randint(0, 16, (176, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    except (RuntimeError, AttributeError):
        return None
    for block, split in ((64, True), (32, True), (32, False), (64, False), (16, False)):
        try:
            if torch.equal(_codes_t_blocked(packed, 176, 64, block, split).t().int(), probe):
                return block, split
        except RuntimeError:
            continue
    return None


class Int4Weight(nn.Module):
    """A frozen (N x K) weight in 4 bits; `dequantize()` gives it back in fp32."""

    kind = "int4"

    def __init__(self, packed: Tensor, scale_zero: Tensor, shape: tuple[int, int], kernel: bool):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)  # (K/32, N, 2) bf16: (s, z)
        self.shape = tuple(shape)
        self.kernel = kernel  # packed in the kernel's layout (else plainly)

    # ----- building -----------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor) -> Int4Weight:
        """From codes (N, K) in 0..15 and per-group scale, zero (N, K/32): W = (q - 8)·s + z."""
        n, k = codes.shape
        if not supports(n, k):
            raise ValueError(f"int4 needs inputs in groups of {GROUP} and outputs in blocks of 16, got {n}x{k}")
        scale_zero = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
        layout = kernel_layout()
        if layout is not None:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        else:
            packed = _pack_plain(codes.to(torch.uint8))
        return cls(packed, scale_zero, (n, k), kernel=layout is not None)

    @classmethod
    def quantize(cls, weight: Tensor) -> Int4Weight:
        """Round-to-nearest on each group's [min, max] (scale and zero rounded to bf16 first)."""
        n, k = weight.shape
        groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round((groups - zero[..., None]) / safe[..., None] + 8).clamp(0, 15)
        return cls.from_codes(codes.to(torch.uint8).reshape(n, k), scale, zero)

    # ----- reading ------------------------------------------------------------------------
    @property
    def row_block(self) -> int:
        """Row ranges starting at multiples of this can be read on their own."""
        return kernel_layout()[0] if self.kernel else 1

    def codes_t(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Codes of rows [start, stop) as a contiguous (K, rows) tensor (per-group scales then broadcast
        over the inner dimension); `start` a multiple of `row_block`."""
        n, k = self.shape
        stop = n if stop is None else stop
        packed = self.packed.reshape(-1)[start * k // 2 : stop * k // 2]
        if not self.kernel:
            return _codes_t_plain(packed.view(stop - start, k // 2), stop - start, k)
        block, split = kernel_layout()
        return _codes_t_blocked(packed, stop - start, k, block, split)

    def dequantize(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows [start, stop) of W in fp32, as the transpose of a contiguous (K, rows) tensor (what a GEMM
        reads fastest)."""
        n, k = self.shape
        stop = n if stop is None else stop
        scale_zero = self.scale_zero[:, start:stop].float()
        scale = scale_zero[..., 0][:, None, :]  # (K/32, 1, rows)
        zero = scale_zero[..., 1][:, None, :] - 8 * scale
        codes = self.codes_t(start, stop).view(k // GROUP, GROUP, stop - start).float()
        return torch.addcmul(zero, codes, scale).view(k, stop - start).t()

    def kernel_matmul(self, x: Tensor) -> Tensor:
        """x (M, K) @ Wᵀ with torch's int4 kernel: activations rounded to bf16, fp32 out."""
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scale_zero)
        return out.float()

    @property
    def has_kernel(self) -> bool:
        return self.kernel

    def nbytes(self) -> int:
        return self.packed.numel() + self.scale_zero.numel() * 2

    def extra_repr(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}, int4 groups of {GROUP}, kernel layout={self.kernel}"
