"""GGUF's 4-bit blocks read as Int4Weight codes, and the nearest lorakit storage for every GGUF type.

One row of a GGUF matrix is a run of blocks along the inputs. The 4-bit ones map onto
W = (q - 8)·s + z with groups of 32 (int4.py) code for code:

    Q4_0  18 bytes / 32:  d (f16), 16 bytes of codes      w = d·(q - 8)        s = d,     z = 0
    Q4_1  20 bytes / 32:  d, m (f16), 16 bytes of codes   w = d·q + m          s = d,     z = m + 8d
    Q4_K 144 bytes / 256: d, dmin (f16), 12 bytes of 6-bit (sc, mn) per 32, 128 bytes of codes
                                                          w = d·sc·q - dmin·mn  s = d·sc, z = 8·d·sc - dmin·mn

In each 32-block of Q4_0 / Q4_1 byte j holds inputs j (low nibble) and j + 16 (high); in Q4_K each
64 inputs share 32 bytes, low nibbles the first 32 and high nibbles the next. Only s and z are
rounded (to bf16, the kernel's format); the codes are the file's.
"""

from __future__ import annotations

import numpy as np
import torch

EXACT_INT4 = ("Q4_0", "Q4_1", "Q4_K")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def bits_per_weight(type_name: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return size * 8 / block


def nearest_kind(type_name: str) -> str:
    """The lorakit storage closest to a quantized GGUF type: int4 up to 5 bits per weight, else int8."""
    return "int4" if bits_per_weight(type_name) <= 5.0 else "int8"


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: the low nibbles first, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_codes(data: np.ndarray, type_name: str, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """(codes (rows, cols) uint8, scale, zero (rows, cols/32) fp32) of a Q4_0 / Q4_1 / Q4_K matrix."""
    raw = np.asarray(data, dtype=np.uint8).reshape(rows, -1)
    if type_name == "Q4_0":
        blocks = raw.reshape(rows, cols // 32, 18)
        scale = _f16(blocks[..., 0:2])
        zero = np.zeros_like(scale)
        codes = _split_nibbles(blocks[..., 2:])
    elif type_name == "Q4_1":
        blocks = raw.reshape(rows, cols // 32, 20)
        scale, low = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        zero = low + 8 * scale
        codes = _split_nibbles(blocks[..., 4:])
    elif type_name == "Q4_K":
        from gguf.quants import Q4_K

        blocks = raw.reshape(-1, 144)
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
        scale = d[:, None] * sc.astype(np.float32)  # (blocks, 8)
        zero = 8 * scale - dmin[:, None] * mn.astype(np.float32)
        qs = blocks[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 32 bytes: 64 inputs each
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
        scale, zero = scale.reshape(rows, cols // 32), zero.reshape(rows, cols // 32)
    else:
        raise ValueError(f"{type_name} is not one of {', '.join(EXACT_INT4)}")
    codes = codes.reshape(rows, cols)
    return torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(scale.copy()), torch.from_numpy(zero.copy())


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor in fp32 (gguf-py's reference dequantization), shaped as numpy sees it."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as reference

    values = reference(np.asarray(data), GGMLQuantizationType[type_name])
    return np.asarray(values, dtype=np.float32).reshape(shape)
