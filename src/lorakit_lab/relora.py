"""ReLoRA-style merge-and-restart (Lialin et al. 2023, arXiv:2307.05695).

Train a LoRA adapter for `every` steps, fold s·B·A into the (trainable-by-merging) base weight,
draw a fresh A, zero B, drop the adapter's optimizer state and re-warm the learning rate. Each
cycle adds an update of rank <= r, so after k cycles the total update W - W_init can reach rank
k·r, which a single LoRA adapter never can. (The paper also warms up with full-rank steps and
prunes rather than zeroes the optimizer state; this version keeps only the restart, to isolate it.)
"""

from __future__ import annotations

import math

import torch

from lorakit.model_state import lora_layers


@torch.no_grad()
def merge_and_restart(
    model: torch.nn.Module, name: str, optimizer: torch.optim.Optimizer, generator: torch.Generator | None = None
) -> int:
    """Fold adapter `name` into its base weights and restart it from B = 0; returns the layers touched."""
    touched = 0
    for _, layer in lora_layers(model):
        if name not in layer.specs:
            continue
        weight = layer.base_layer.weight
        weight.add_(layer.delta_weight(name).reshape(weight.shape).to(weight.dtype))
        a, b = layer.lora_A[name], layer.lora_B[name]
        bound = 1.0 / math.sqrt(layer.in_dim)  # the same Kaiming-uniform draw inject() uses
        a.uniform_(-bound, bound, generator=generator)
        b.zero_()
        for p in (a, b):
            optimizer.state.pop(p, None)
        touched += 1
    return touched


def jagged_factor(step: int, every: int, rewarm: int) -> float:
    """ReLoRA's jagged schedule: after each restart the learning rate ramps up again over `rewarm` steps."""
    if step < every:
        return 1.0
    since = step % every
    return min(1.0, (since + 1) / rewarm)
