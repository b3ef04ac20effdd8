"""The slot stack a layer keeps for per-row batches: every adapter zero-padded into one tensor.

    A: (n+1, r_max, k)    (s·B)ᵀ: (n+1, r_max, d)    DoRA's g: (n+1, d)    slot 0: no adapter

Zero-padding ranks to r_max is exact, so adapters of different ranks share the batched matmuls of
per_row.py, and slot 0 (all zeros, g = 1) gives a row the base output.

For inference the stack persists and is kept in sync incrementally: a new or changed adapter
rewrites only its own slot (hot-loading costs one slot copy per layer), a deleted one frees its
slot. When gradients flow into an adapter a fresh, differentiable stack of just the adapters the
batch uses is built instead, so per-row batches can also train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Stacked = tuple[dict[str, int], Tensor, Tensor, "Tensor | None"]  # slot per adapter, A, (s·B)ᵀ, DoRA's g or None


class SlotStack:
    """The persistent padded stack of one layer's adapters (inference only, never differentiable)."""

    def __init__(self) -> None:
        self.a: Tensor | None = None  # (capacity+1, r_max, k)
        self.b_t: Tensor | None = None  # (capacity+1, r_max, d), already scaled by s
        self.dora: Tensor | None = None  # (capacity+1, d): DoRA's m/||W0+ΔW|| per slot, 1 elsewhere
        self.slot: dict[str, int] = {}
        self.free: list[int] = []
        self.reserved = 8  # slots allocated up front; more double the stack (one copy each time)
        # name -> (LoraWrapper.adapter_keys entry, (A, B, m)) of what the slot was copied from. Holding the
        # tensors keeps their ids from being reused, so a deleted and re-added adapter never passes for the old one.
        self.seen: dict[str, tuple] = {}

    @property
    def capacity(self) -> int:
        return 0 if self.a is None else self.a.shape[0] - 1

    def stacked(self, layer, used: list[str]) -> Stacked:
        """(slot of each adapter, A stack, (s·B)ᵀ stack, DoRA's g or None) for `layer`.

        `used` names the adapters of `layer` a batch needs; if gradients must reach any of them the
        result is a fresh differentiable stack of just those, else this persistent, synced stack.
        """
        a_of, b_of, _ = layer.adapter_tensors()
        if torch.is_grad_enabled() and any(a_of[n].requires_grad or b_of[n].requires_grad for n in used):
            return differentiable_stack(layer, used)
        self.sync(layer, used)
        if self.a is None:  # no adapters at all
            weight = layer.weight_2d()
            return {}, weight.new_zeros((1, 1, layer.in_dim)), weight.new_zeros((1, 1, layer.out_dim)), None
        return self.slot, self.a, self.b_t, self.dora

    def reserve(self, slots: int) -> None:
        """Make room for `slots` adapters now, so later loads never pay for growth."""
        self.reserved = max(self.reserved, slots)
        while self.a is not None and self.capacity < slots:
            self._grow()

    def sync(self, layer, names: list[str]) -> None:
        """Make the slots of adapters `names` match their tensors (copying only what changed), and
        free the slots of deleted adapters. Other adapters are copied in when a batch first uses them."""
        specs = layer.specs
        for name in [n for n in self.slot if n not in specs]:
            self._release(name)
        if not names:
            return
        a_of, b_of, m_of = layer.adapter_tensors()
        first = a_of[names[0]]
        if (
            self.a is None
            or max(specs[n].r for n in names) > self.a.shape[1]
            or self.a.dtype != first.dtype
            or self.a.device != first.device
        ):  # (re)allocate wide enough for every adapter of the layer
            r_max = max(s.r for s in specs.values())
            self._allocate(len(specs), layer.in_dim, layer.out_dim, r_max, first.dtype, first.device)
        if self.dora is None and m_of:  # some adapter of the layer has DoRA's m
            self.dora = self.a.new_ones((self.capacity + 1, layer.out_dim))
        for name, key in zip(names, layer.adapter_keys(names)):
            old = self.seen.get(name)
            if old is None or old[0] != key:
                self._write(layer, name, self._slot_for(name))
                self.seen[name] = (key, (a_of[name], b_of[name], m_of.get(name)))

    def _allocate(self, count: int, k: int, d: int, r_max: int, dtype: torch.dtype, device: torch.device) -> None:
        capacity = max(count, self.reserved)
        self.a = torch.zeros((capacity + 1, r_max, k), dtype=dtype, device=device)
        self.b_t = torch.zeros((capacity + 1, r_max, d), dtype=dtype, device=device)
        self.dora = None
        self.slot, self.seen, self.free = {}, {}, list(range(capacity, 0, -1))

    def _slot_for(self, name: str) -> int:
        if name not in self.slot:
            if not self.free:
                self._grow()
            self.slot[name] = self.free.pop()
        return self.slot[name]

    def _grow(self) -> None:
        """Double the capacity, keeping every slot where it is."""
        old = self.capacity
        self.a = torch.cat([self.a, torch.zeros_like(self.a[1:])])
        self.b_t = torch.cat([self.b_t, torch.zeros_like(self.b_t[1:])])
        if self.dora is not None:
            self.dora = torch.cat([self.dora, torch.ones_like(self.dora[1:])])
        self.free = list(range(2 * old, old, -1)) + self.free

    def _write(self, layer, name: str, slot: int) -> None:
        spec = layer.specs[name]
        a, b_t = self.a[slot], self.b_t[slot]
        with torch.no_grad():
            a[: spec.r].copy_(layer.a_2d(name))
            b_t[: spec.r].copy_(layer.b_2d(name).t()).mul_(spec.scale)
            if spec.r < a.shape[0]:  # zero the padding (a reused slot may hold an older, larger adapter)
                a[spec.r :].zero_()
                b_t[spec.r :].zero_()
            if self.dora is not None:
                self.dora[slot] = layer.dora_scale(name) if spec.use_dora else 1.0

    def _release(self, name: str) -> None:
        slot = self.slot.pop(name)
        self.seen.pop(name, None)
        self.a[slot].zero_()
        self.b_t[slot].zero_()
        if self.dora is not None:
            self.dora[slot] = 1.0
        self.free.append(slot)


def differentiable_stack(layer, names: list[str]) -> Stacked:
    """A fresh stack of just `names`, built from the live parameters so gradients reach them."""
    r_max = max(layer.specs[n].r for n in names)
    like = layer.a_2d(names[0])
    a_rows = [like.new_zeros((r_max, layer.in_dim))]
    b_rows = [like.new_zeros((layer.out_dim, r_max))]
    for n in names:
        pad = r_max - layer.specs[n].r
        a_rows.append(F.pad(layer.a_2d(n), (0, 0, 0, pad)))
        b_rows.append(F.pad(layer.specs[n].scale * layer.b_2d(n), (0, pad)))
    dora = None
    if any(layer.specs[n].use_dora for n in names):
        ones = a_rows[0].new_ones(layer.out_dim)
        dora = torch.stack([ones] + [layer.dora_scale(n) if layer.specs[n].use_dora else ones for n in names])
    return {n: i + 1 for i, n in enumerate(names)}, torch.stack(a_rows), torch.stack(b_rows).transpose(1, 2), dora
