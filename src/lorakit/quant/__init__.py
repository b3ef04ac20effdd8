"""A quantized (or 16-bit) frozen base under fp32 adapters: QLoRA-style training and serving on CPUs.

int4.py       Int4Weight: 4-bit codes, scale + zero per 32 inputs (GGUF Q4_0/Q4_1/Q4_K exactly)
int8.py       Int8Weight: 8-bit codes, one scale per output row
half.py       HalfWeight: bf16 / fp16 storage
compute.py    which kernel or GEMM runs each storage on this CPU (measured once, logged)
linear.py     QuantLinear: frozen Linear over a storage; backward to the input only
embedding.py  QuantEmbedding: frozen embedding table over a storage (row lookups)
convert.py    quantize_base / dequantize_base for a whole model; base_format names
gguf.py       GGUF files in: tensors mapped with transformers' own tables, blocks kept quantized
"""

from .compute import ComputePlan, plan, set_plan
from .convert import (
    FORMATS,
    base_format,
    dequantize_base,
    is_quantized,
    merge_precision,
    quantize_base,
    requantization_error,
    storage_bytes,
    storage_for,
)
from .embedding import QuantEmbedding
from .half import HalfWeight
from .int4 import Int4Weight
from .int8 import Int8Weight
from .linear import QuantLinear

__all__ = [
    "FORMATS",
    "ComputePlan",
    "HalfWeight",
    "Int4Weight",
    "Int8Weight",
    "QuantEmbedding",
    "QuantLinear",
    "base_format",
    "dequantize_base",
    "is_quantized",
    "merge_precision",
    "plan",
    "quantize_base",
    "requantization_error",
    "set_plan",
    "storage_bytes",
    "storage_for",
]
