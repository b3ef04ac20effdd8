"""Per-row batches inside one layer: row b of a batch uses its own adapter (slot 0 = none).

Punica's BGMV idea in plain PyTorch. A layer's adapters live in one zero-padded slot stack
(per_row_stack.py), and a batch gathers its rows' factors and runs two batched matmuls:

    h_b = W0·x_b + (x_b · A[slot_b]ᵀ) · (s·B)ᵀ[slot_b]                  (DoRA: rescaled by g[slot_b])

The cost depends on the batch and on r_max, not on how many distinct adapters the batch uses.

Decoding (one token per row) is memory-bound: each row reads its own r·(k+d) factors, and a
gather would copy them once more before the matmul reads them. There, the A side is a sampled
matmul (SDDMM: x·Aᵀ evaluated only at each row's r columns of the flat stack) and the B side an
`embedding_bag` (each row's weighted sum of its r rows of (s·B)ᵀ), both reading the stack in place.
When every row uses the same adapter (one stream) its slot is read directly: two plain matmuls.
Convolutions have no batched-weight kernel: their rows are grouped by adapter instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LorakitError, merged_error


def check_unmerged(merged: str | None) -> None:
    """Per-row routing needs every adapter outside the base weights."""
    if merged is not None:
        raise merged_error(merged, "per_row")


class RowIndex:
    """Each row's slot, plus the index tensors the one-token-per-row kernels need (built lazily)."""

    def __init__(self, key: tuple[tuple[int, ...], torch.device, int, int]):
        self.key = key  # (slot per row, device, r_max, slots in the stack)
        self.slots = torch.tensor(key[0], dtype=torch.long, device=key[1])
        self.shared = key[0][0] if len(set(key[0])) == 1 else None  # the one slot every row uses, if any
        self._decode: tuple[Tensor, Tensor] | None = None

    def decode_indices(self) -> tuple[Tensor, Tensor]:
        """(CSR pattern picking row b's r_max columns of x·A_flatᵀ, the same flat indices per row)."""
        if self._decode is None:
            _, device, r_max, slots_total = self.key
            rows = self.slots.shape[0]
            flat = (self.slots[:, None] * r_max + torch.arange(r_max, device=device)).contiguous()  # (rows, r_max)
            crow = torch.arange(0, rows * r_max + 1, r_max, device=device)
            values = torch.zeros(rows * r_max, device=device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only its stable core
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(
                    crow, flat.reshape(-1), values, (rows, slots_total * r_max), check_invariants=False
                )
            self._decode = (pattern, flat)
        return self._decode


class PerRow:
    """One `lorakit.per_row` block: each row's adapter name (None = base only), and the row indices
    its layers share (layers holding the same adapters get the same index, built once per layout)."""

    def __init__(self, names: Sequence[str | None]):
        self.names = list(names)
        self._indices: dict[tuple, RowIndex] = {}

    def checked(self, layer, batch: int) -> list[str | None]:
        """The row names, after checking they fit this batch and `layer` has nothing merged."""
        if len(self.names) != batch:
            raise LorakitError(
                f"per_row was given {len(self.names)} adapter names but the batch has {batch} rows; "
                "pass one name (or None) per row"
            )
        check_unmerged(layer.merged)
        return self.names

    def index(self, slot: dict[str, int], device: torch.device, r_max: int, slots_total: int) -> RowIndex:
        """Each row's slot in a stack laid out as `slot` (0 = base only); built once per layout."""
        key = (tuple([slot.get(n, 0) for n in self.names]), device, r_max, slots_total)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) >= 16:  # layouts change as adapters come and go: keep the recent ones
                self._indices.clear()
            index = self._indices[key] = RowIndex(key)
        return index


def _route(layer, batch: int, device: torch.device) -> tuple[RowIndex, Tensor, Tensor, Tensor | None] | None:
    """(row index, A stack, (s·B)ᵀ stack, DoRA's g) or None when no row uses an adapter of this layer."""
    names = layer.per_row.checked(layer, batch)
    used = [n for n in dict.fromkeys(names) if n in layer.specs]
    if not used:
        return None
    slot, a, b_t, dora = layer.stacked(used)
    return layer.per_row.index(slot, device, a.shape[1], a.shape[0]), a, b_t, dora


def delta_decode(index: RowIndex, x2: Tensor, a: Tensor, b_t: Tensor) -> Tensor:
    """One token per row: SDDMM for x·A[slot]ᵀ, then embedding_bag for ·(s·B)ᵀ[slot]; no copies."""
    pattern, flat = index.decode_indices()
    r_max = a.shape[1]
    xa = torch.sparse.sampled_addmm(pattern, x2, a.reshape(-1, a.shape[2]).t(), beta=0.0).values().view(-1, r_max)
    return F.embedding_bag(flat, b_t.reshape(-1, b_t.shape[2]), per_sample_weights=xa, mode="sum")


def _add(layer, out: Tensor, delta: Tensor, dora: Tensor | None, index: RowIndex) -> Tensor:
    """out + delta, or with DoRA: out + (g_b - 1)·(out - bias) + g_b·delta (channels last)."""
    if dora is None:
        return out + delta.to(out.dtype)
    g = dora.index_select(0, index.slots).view(out.shape[0], *([1] * (out.dim() - 2)), -1)
    bias = getattr(layer.base_layer, "bias", None)
    base = out if bias is None else out - bias
    return out + ((g - 1) * base + g * delta).to(out.dtype)


def linear_forward(layer, x: Tensor, out: Tensor) -> Tensor:
    """Linear / Conv1D: out_b + x_b·A[slot_b]ᵀ·(s·B)ᵀ[slot_b]."""
    rows = x.shape[0]
    route = _route(layer, rows, x.device)
    if route is None:
        return out
    index, a, b_t, dora = route
    x3 = x.reshape(rows, -1, x.shape[-1]).to(a.dtype)
    decoding = x3.shape[1] == 1 and not (torch.is_grad_enabled() and a.requires_grad)
    if decoding and index.shared is not None and dora is None and out.dtype == a.dtype:
        # every row uses one adapter (lorakit generate, one stream): two plain matmuls, the add fused
        s = index.shared
        return torch.addmm(out.reshape(rows, -1), torch.mm(x3[:, 0], a[s].t()), b_t[s]).view(out.shape)
    if decoding:
        return _add(layer, out, delta_decode(index, x3[:, 0], a, b_t).view(out.shape), dora, index)
    xa = torch.bmm(x3, a.index_select(0, index.slots).transpose(1, 2))  # (rows, tokens, r_max)
    b_rows = b_t.index_select(0, index.slots)  # (rows, r_max, d)
    out3 = out.reshape(rows, -1, out.shape[-1])
    if dora is None and out3.dtype == xa.dtype:
        return torch.baddbmm(out3, xa, b_rows).view(out.shape)  # the add fused into the matmul
    return _add(layer, out, torch.bmm(xa, b_rows).view(out.shape), dora, index)


def embedding_forward(layer, ids: Tensor, out: Tensor) -> Tensor:
    """Embedding: out_b + A[slot_b][:, ids_b]ᵀ·(s·B)ᵀ[slot_b]; the lookup replaces the first matmul."""
    rows = ids.shape[0]
    route = _route(layer, rows, ids.device)
    if route is None:
        return out
    index, a, b_t, dora = route
    xa = a[index.slots[:, None], :, ids.reshape(rows, -1)]  # (rows, tokens, r_max)
    delta = torch.bmm(xa, b_t.index_select(0, index.slots)).view(out.shape)
    return _add(layer, out, delta, dora, index)


def conv_forward(layer, x: Tensor, out: Tensor) -> Tensor:
    """Convolutions: the rows of each adapter get exactly the term it adds alone (LoRA's or DoRA's)."""
    names = layer.per_row.checked(layer, x.shape[0])
    result = out
    for name in [n for n in dict.fromkeys(names) if n in layer.specs]:
        index = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
        term = layer.adapter_term(x[index], out[index], name)
        result = result.index_add(0, index, term.to(out.dtype))
    return result
