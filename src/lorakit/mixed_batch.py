"""Mixed batches: row b of a batch runs with its own adapter (or none), in one forward pass.

Each LoRA layer keeps its adapters stacked (A: n+1 x r_max x k, (s·B)ᵀ: n+1 x r_max x d, slot 0
all zeros), so a mixed batch costs a gather and two batched matmuls per layer whatever the number
of distinct adapters (Punica's BGMV idea in plain PyTorch; the kernels are in layers/rows.py):

    h_b = W0·x_b + s·B[slot_b]·(A[slot_b]·x_b)

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
from .layers import LoraLayer, SavedModule
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
    if merged_adapter(model) is not None:
        raise LorakitError(f"adapter '{merged_adapter(model)}' is merged; call lorakit.unmerge(model) before per_row")
    routed = [m for _, m in walk(model) if isinstance(m, (LoraLayer, SavedModule))]
    holder = prefixes(model)
    for module in routed:
        module.row_adapters = names
    if holder is not None:
        holder.row_prefixes = [n if n in own_prefixes else None for n in names]
    try:
        yield model
    finally:
        for module in routed:
            module.row_adapters = None
        if holder is not None:
            holder.row_prefixes = None
