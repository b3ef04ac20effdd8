"""Activations saved for backward, stored in bf16 while the arithmetic stays fp32.

    forward: y = f(x) in fp32;  saved for backward: bf16(x);  backward: f'(fp32(bf16(x)))

With the frozen base in 4 bits, what training holds is the activations autograd keeps between
forward and backward (SmolLM2 at batch 8 x ~80 tokens: ~0.6 GB, five times its int4 weights).
QLoRA keeps them in bf16 because it computes in bf16; here the forward stays fp32 (storage is not
compute) and only what waits for backward is rounded to bf16 (8 bits of mantissa, relative error
<= 2^-9), which halves that memory and moves only gradients, by about that relative amount.

Parameters (the adapters' A and B), integer tensors and small tensors are kept as they are; a
tensor saved twice in one forward (one input feeding q and v) is stored once.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

MIN_ELEMENTS = 1 << 14  # smaller tensors are not worth a copy


class _Store:
    """saved_tensors_hooks that keep float32 activations as bf16 copies, one per tensor."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.seen: dict[int, tuple[weakref.ref, Tensor]] = {}

    def pack(self, tensor: Tensor):
        if tensor.dtype != torch.float32 or tensor.numel() < MIN_ELEMENTS or isinstance(tensor, nn.Parameter):
            return tensor
        # A view is known by its base tensor (kept alive by its weak reference's check) and its geometry,
        # so the same activation saved through two views (q_proj's and v_proj's input) is stored once.
        owner = tensor._base if tensor._base is not None else tensor
        key = (id(owner), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        entry = self.seen.get(key)
        if entry is not None and entry[0]() is owner:
            return entry[1]
        packed = (tensor.to(self.dtype),)  # a tuple marks "unpack me"
        self.seen[key] = (weakref.ref(owner), packed)
        return packed

    @staticmethod
    def unpack(value):
        return value[0].float() if isinstance(value, tuple) else value


def _enter(module: nn.Module, args) -> None:
    dtype = module.__dict__["lorakit_saved_dtype"]
    hooks = None
    if dtype != torch.float32 and module.training and torch.is_grad_enabled():
        store = _Store(dtype)
        hooks = torch.autograd.graph.saved_tensors_hooks(store.pack, store.unpack)
        hooks.__enter__()
    module.__dict__.setdefault("_lorakit_saved_stack", []).append(hooks)


def _exit(module: nn.Module, args, output) -> None:
    stack = module.__dict__.get("_lorakit_saved_stack")
    hooks = stack.pop() if stack else None
    if hooks is not None:
        hooks.__exit__(None, None, None)


def store_activations(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Keep the activations `model` saves for backward in `dtype` (torch.bfloat16) while training; None: as computed."""
    if "lorakit_saved_dtype" not in model.__dict__:
        model.register_forward_pre_hook(_enter)
        model.register_forward_hook(_exit, always_call=True)
    model.__dict__["lorakit_saved_dtype"] = dtype if dtype is not None else torch.float32
