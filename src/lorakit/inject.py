"""inject(): find the modules a LoraConfig targets, wrap each in a LoRA layer in place, freeze the rest.

Wrapping swaps the module in its parent (PEFT's trick), so it works on any nn.Module tree. The change
goes through attach.py's plan-then-apply path, so a bad config leaves the model exactly as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from .apply_plan import apply
from .attach import plan_new
from .config import LoraConfig
from .quant import base_format, quantize_base
from .targets import DEFAULT_TARGETS, find_targets  # noqa: F401  (re-exported: callers import them from here)


def inject(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    base_dtype: torch.dtype | str | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Add adapter `name` to every module `config` targets, make it the active and only trainable part.

    base_dtype ("bf16", "fp16", "int8", "int4" or a torch dtype) stores the frozen base in that
    format (lorakit.quant; int4 keeps embeddings and the output head at int8), while adapters and
    their optimizer state stay fp32: QLoRA on a CPU. See `cast_base`.
    """
    if base_dtype is not None:
        check_base_dtype(base_dtype)
    plan = plan_new(model, config, name)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    apply(model, plan, trainable=True, activate=True, generator=generator)
    if base_dtype is not None:
        cast_base(model, base_dtype)
    return model


def check_base_dtype(dtype: object) -> None:
    """Raises LorakitError unless `dtype` names a storage format (lorakit.quant.base_format)."""
    base_format(dtype)


def cast_base(model: nn.Module, dtype) -> None:
    """Store the frozen base in `dtype`: "bf16" / "fp16" (or torch.bfloat16 / torch.float16), "int8" or "int4".

    Storage is not compute (lorakit.quant): every frozen Linear / Conv1D / Embedding becomes a
    quantized layer that runs the arithmetic this CPU does natively (chosen once and logged), so a
    bf16 base on a CPU without native bf16 multiplies in fp32 instead of in ~6x slower bf16 GEMMs.
    Norms, convolutions, adapters and everything trainable stay fp32.
    """
    quantize_base(model, base_format(dtype))
