"""Which arithmetic runs a quantized or 16-bit frozen base on this CPU, decided once per process.

Storage is not compute. For an input of M rows, a layer stored as `kind` runs

    M <= plan.kernel_rows[kind]:  the storage's own kernel (torch's int4 / int8 weight-only kernels,
                                  or a 16-bit GEMM), which reads the packed weight directly: what
                                  decoding, a few rows at a time and bound by memory, wants;
    otherwise:                    the layer dequantized to fp32 and an fp32 GEMM: what compute-bound
                                  batches (training, prefill) want on a CPU without native low-precision
                                  arithmetic. Backward is always dy·W with W dequantized to fp32.

The rules come from what the CPU does natively (torch.backends.cpu.get_cpu_capability() and the
AVX-512 BF16 / AMX flags torch.cpu reports):
  - int4 / int8 on an AVX2 or AVX-512 build: torch's vectorized weight-only kernels (bf16
    activations, fp32 accumulation) up to 16 rows; `benchmarks/quant_base.py --kernels` measures
    the crossover against dequantize + fp32 GEMM (on this project's AVX2 EPYC it lies between 16
    and 64 rows with the weights streaming from memory, as they do in a real model); elsewhere
    (no vectorized kernel) always dequantize.
  - bf16 storage: bf16 GEMMs wherever bf16 is native (AVX-512 BF16, AMX, GPUs); on AVX2 a bf16 GEMM
    is ~6x slower than fp32, so only single rows (memory-bound: half the bytes) run in bf16 and
    everything else is upcast per layer. fp16 storage: fp16 GEMMs only where AMX-FP16 exists or on GPUs.
`LORAKIT_KERNEL_ROWS="int4=4,int8=4,bf16=0"` overrides the thresholds. The plan is logged once
("lorakit.quant"), so a run log says which path ran.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import LorakitError

log = logging.getLogger("lorakit.quant")
KINDS = ("int4", "int8", "bf16", "fp16")
KERNEL_ROWS = 16  # int4 / int8 kernel up to this many rows (see the module docstring)


@dataclass
class ComputePlan:
    capability: str
    kernel_rows: dict[str, float] = field(default_factory=dict)  # kind -> largest M that uses the kernel
    native_bf16: bool = False
    source: str = "CPU flags"

    def describe(self) -> str:
        def path(kind: str) -> str:
            limit = self.kernel_rows.get(kind, 0)
            if limit == 0:
                return f"{kind}: dequantize per layer + fp32 GEMM"
            if math.isinf(limit):
                return f"{kind}: {kind} GEMM"
            return f"{kind}: kernel for <= {int(limit)} rows, else dequantize per layer + fp32 GEMM"

        native = "native bf16" if self.native_bf16 else "no native bf16"
        return f"CPU {self.capability}, {native} ({self.source}): " + "; ".join(path(k) for k in KINDS)


_PLAN: ComputePlan | None = None


def plan() -> ComputePlan:
    """This process's plan (decided on first use, then logged)."""
    global _PLAN
    if _PLAN is None:
        _PLAN = _from_flags()
        _PLAN = _pinned(_PLAN) or _PLAN
        log.info("quantized base compute path: %s", _PLAN.describe())
    return _PLAN


def set_plan(new: ComputePlan | None) -> ComputePlan | None:
    """Replace the plan (None: decide again on next use); returns the old one. For tests and benchmarks."""
    global _PLAN
    old, _PLAN = _PLAN, new
    return old


def _flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check()) if callable(check) else False
    except RuntimeError:
        return False


def _from_flags() -> ComputePlan:
    from .int4 import kernel_layout

    capability = torch.backends.cpu.get_cpu_capability()
    vectorized = capability.startswith(("AVX2", "AVX512"))
    native_bf16 = _flag("_is_avx512_bf16_supported") or _flag("_is_amx_tile_supported")
    rows: dict[str, float] = {
        "int4": KERNEL_ROWS if vectorized and kernel_layout() is not None else 0,
        "int8": KERNEL_ROWS if vectorized else 0,
        "bf16": math.inf if native_bf16 else (1 if vectorized else 0),
        "fp16": math.inf if _flag("_is_amx_fp16_supported") else 0,
    }
    return ComputePlan(capability, rows, native_bf16)


def _pinned(base: ComputePlan) -> ComputePlan | None:
    spec = os.environ.get("LORAKIT_KERNEL_ROWS")
    if not spec:
        return None
    rows = dict(base.kernel_rows)
    for part in spec.split(","):
        kind, _, value = part.partition("=")
        kind, value = kind.strip(), value.strip()
        if kind not in KINDS or not (value == "inf" or value.isdigit()):
            raise LorakitError(
                f"LORAKIT_KERNEL_ROWS={spec!r} is invalid: give kind=rows pairs with kinds {', '.join(KINDS)} and "
                "rows an integer >= 0 or inf, e.g. int4=4,int8=4,bf16=0"
            )
        rows[kind] = math.inf if value == "inf" else int(value)
    return ComputePlan(base.capability, rows, base.native_bf16, source="LORAKIT_KERNEL_ROWS")


def use_kernel(storage, rows: int, device: torch.device) -> bool:
    """Whether `rows` input rows on `device` run the storage's kernel (else dequantize + fp32)."""
    if device.type != "cpu":
        return storage.kind in ("bf16", "fp16")  # GPUs have native 16-bit GEMMs; the int kernels here are CPU ones
    return bool(storage.has_kernel) and rows <= plan().kernel_rows.get(storage.kind, 0)
