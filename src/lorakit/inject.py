"""inject(): find the modules a LoraConfig targets, wrap each in a LoRA layer in place, freeze the rest.

Wrapping swaps the module in its parent (PEFT's trick), so it works on any nn.Module tree. The change
goes through attach.py's plan-then-apply path, so a bad config leaves the model exactly as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from .attach import apply, plan_new
from .config import LoraConfig
from .errors import LorakitError
from .layers import LoraLayer, SavedModule
from .targets import DEFAULT_TARGETS, find_targets  # noqa: F401  (re-exported: callers import them from here)


def inject(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    base_dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Add adapter `name` to every module `config` targets, make it the active and only trainable part.

    base_dtype=torch.bfloat16 stores the frozen base in bf16 (norms stay fp32) and runs the
    forward under bf16 autocast, while adapters and their optimizer state stay fp32.
    """
    if base_dtype is not None:
        check_base_dtype(base_dtype)
    plan = plan_new(model, config, name)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    apply(model, plan, trainable=True, activate=True, generator=generator)
    if base_dtype is not None:
        cast_base(model, base_dtype)
    return model


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for store in (module.lora_A, module.lora_B, module.lora_magnitude):
                ids |= {id(p) for p in store.values()}
        elif isinstance(module, SavedModule):
            ids |= {id(p) for p in module.copies.parameters()}
    return ids


def _upcast_output(module: nn.Module, args, output):
    return output.float() if torch.is_tensor(output) and output.dtype != torch.float32 else output


def _enter_autocast(module: nn.Module, args) -> None:
    device = next(module.parameters()).device.type
    ctx = torch.autocast(device_type=device, dtype=module.lorakit_base_dtype)
    ctx.__enter__()
    module.__dict__.setdefault("_lorakit_autocast_stack", []).append(ctx)


def _exit_autocast(module: nn.Module, args, output) -> None:
    module.__dict__["_lorakit_autocast_stack"].pop().__exit__(None, None, None)


def check_base_dtype(dtype: object) -> None:
    if dtype not in (torch.bfloat16, torch.float16):
        raise LorakitError(f"base_dtype={dtype!r} is not supported; use torch.bfloat16 (or torch.float16 on GPUs)")


def cast_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen base weights in `dtype` and run forward under autocast to it.

    Norm layers keep fp32 weights and embeddings hand fp32 vectors to the residual stream, so the
    numerics match running the fp32 model under autocast; adapters are never cast.
    """
    check_base_dtype(dtype)
    keep = _adapter_parameter_ids(model)
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            continue
        for param in module.parameters(recurse=False):
            if id(param) not in keep and not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(dtype)
        if isinstance(module, nn.Embedding) and not getattr(module, "_lorakit_upcast", False):
            module.register_forward_hook(_upcast_output)
            module._lorakit_upcast = True
    if "lorakit_base_dtype" not in model.__dict__:
        model.register_forward_pre_hook(_enter_autocast)
        model.register_forward_hook(_exit_autocast, always_call=True)
    model.lorakit_base_dtype = dtype
