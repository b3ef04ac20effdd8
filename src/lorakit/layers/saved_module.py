"""Modules trained fully alongside an adapter (PEFT's `modules_to_save`), e.g. a classifier head.

Each adapter gets its own trainable copy; the original stays frozen and is used when no
adapter (or an adapter without a copy) is active. Copies are saved in full with the adapter.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .per_row import PerRow


class SavedModule(nn.Module):
    """Routes forward to the active adapter's copy of `original_module`."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.per_row: PerRow | None = None  # set by lorakit.per_row: each batch row's own copy

    def add_copy(self, name: str) -> None:
        original = self.original_module
        if getattr(original, "lorakit_quantized", False):  # a trainable copy of a quantized layer is an fp32 layer
            original = original.dequantized()
        self.copies[name] = copy.deepcopy(original)
        for param in self.copies[name].parameters():
            param.requires_grad_(True)

    def delete_copy(self, name: str) -> None:
        if name in self.copies:
            del self.copies[name]
        if self.active == name:
            self.active = None

    def current(self) -> nn.Module:
        return self.copies[self.active] if self.active in self.copies else self.original_module

    def forward(self, *args, **kwargs):
        if self.per_row is None:
            return self.current()(*args, **kwargs)
        out = self.original_module(*args, **kwargs)
        names = self.per_row.names
        for name in {n for n in names if n in self.copies}:
            rows = torch.tensor([n == name for n in names], device=out.device)
            mask = rows.view(-1, *([1] * (out.dim() - 1)))
            out = torch.where(mask, self.copies[name](*args, **kwargs), out)
        return out
