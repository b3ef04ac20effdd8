"""per_row: in one forward pass, row b of a batch runs with its own adapter (or none): a mixed batch.

Each LoRA layer keeps its adapters stacked (A: n+1 x r_max x k, (s·B)ᵀ: n+1 x r_max x d, slot 0
all zeros), so a mixed batch costs a gather and two batched matmuls per layer whatever the number
of distinct adapters (Punica's BGMV idea in plain PyTorch; layers/per_row.py has the kernels,
layers/per_row_stack.py the stacks):

    h_b = W0·x_b + s·B[slot_b]·(A[slot_b]·x_b)          (DoRA: rescaled by g[slot_b] per channel)

The stacks are synced incrementally, so adapters can be loaded and deleted between batches.
A row may also name a prefix (lorakit.add_prefix): its keys and values go in front of that row's
attention only, shorter prefixes left-padded and masked, so each row computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

from torch import nn

from .adapters import merged_adapter
from .errors import LorakitError
from .layers import LoraWrapper, SavedModule
from .layers.per_row import PerRow, check_unmerged
from .model_state import require_adapter, walk
from .prefix import list_prefixes, prefixes


@contextmanager
def per_row(model: nn.Module, names: Sequence[str | None]):
    """Inside the block, batch row i uses adapter (or prefix) names[i] (None = the base model for that row)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise LorakitError("per_row needs a non-empty list with one adapter name (or None) per batch row")
    names = list(names)
    own_prefixes = set(list_prefixes(model))
    for name in set(names) - {None} - own_prefixes:
        require_adapter(model, name)
    check_unmerged(merged_adapter(model))
    routed = [m for _, m in walk(model) if isinstance(m, (LoraWrapper, SavedModule))]
    holder = prefixes(model)
    batch = _routing(model, names)
    for module in routed:
        module.per_row = batch
    if holder is not None:
        holder.row_prefixes = [n if n in own_prefixes else None for n in names]
    try:
        yield model
    finally:
        for module in routed:
            module.per_row = None
        if holder is not None:
            holder.row_prefixes = None


def _routing(model: nn.Module, names: list[str | None]) -> PerRow:
    """The previous block's PerRow when it routed the same names (decoding steps do), so its row
    indices are reused (they are keyed by each stack's layout, so they stay right); else a new one."""
    last = model.__dict__.get("lorakit_per_row")
    if last is None or last.names != names:
        last = model.__dict__["lorakit_per_row"] = PerRow(names)
    return last
