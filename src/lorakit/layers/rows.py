"""Mixed batches inside one layer: row b of a batch uses its own adapter (slot 0 = none).

Punica's BGMV idea in plain PyTorch. Every adapter of a layer lives in one zero-padded stack,

    A: (n+1, r_max, k)    (s·B)ᵀ: (n+1, r_max, d)    slot 0 all zeros,

and a batch gathers its rows' factors and runs two batched matmuls:

    h_b = W0·x_b + (x_b · A[slot_b]ᵀ) · (s·B)ᵀ[slot_b]

The cost depends on the batch and on r_max, not on how many distinct adapters the batch uses.
Zero-padding ranks to r_max is exact, so adapters of different ranks share the matmuls.

Decoding (one token per row) is memory-bound: each row reads its own r·(k+d) factors, and a
gather would copy them once more before the matmul reads them. There, the A side is a sampled
matmul (SDDMM: x·Aᵀ evaluated only at each row's r columns of the flat stack) and the B side an
`embedding_bag` (each row's weighted sum of its r rows of (s·B)ᵀ), both reading the stack in place.
When every row uses the same adapter (one stream) its slot is read directly: two plain matmuls.

For inference the stack persists and is kept in sync incrementally: a new or changed adapter
rewrites only its own slot (hot-loading costs one slot copy per layer), a deleted one frees its
slot. When gradients flow into an adapter a fresh, differentiable stack of just the adapters the
batch uses is built instead, so mixed batches can also train.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LorakitError


class SlotStack:
    """The persistent padded stack of one layer's adapters (inference only, never differentiable)."""

    def __init__(self) -> None:
        self.a: Tensor | None = None  # (capacity+1, r_max, k)
        self.b_t: Tensor | None = None  # (capacity+1, r_max, d), already scaled by s
        self.dora: Tensor | None = None  # (capacity+1, d): DoRA's m/||W0+ΔW|| per slot, 1 elsewhere
        self.slot: dict[str, int] = {}
        self.free: list[int] = []
        self.reserved = 8  # slots allocated up front; more double the stack (one copy each time)
        # name -> (A, B, m, versions): the exact tensors and versions the slot was copied from.
        # Holding the tensors (not their ids) means a deleted and re-added adapter is never
        # mistaken for the old one.
        self.seen: dict[str, tuple] = {}

    @property
    def capacity(self) -> int:
        return 0 if self.a is None else self.a.shape[0] - 1

    def sync(self, layer, names: list[str]) -> None:
        """Make the slots of adapters `names` match their tensors (copying only what changed), and
        free the slots of deleted adapters. Other adapters are copied in when a batch first uses them."""
        specs = layer.specs
        if any(n not in specs for n in self.slot):
            for name in [n for n in self.slot if n not in specs]:
                self._release(name)
        if not names:
            return
        a_params, b_params, m_params = (
            layer.lora_A._parameters,
            layer.lora_B._parameters,
            layer.lora_magnitude._parameters,
        )
        first = a_params[names[0]]
        if (
            self.a is None
            or max(specs[n].r for n in names) > self.a.shape[1]
            or self.a.dtype != first.dtype
            or self.a.device != first.device
        ):  # (re)allocate wide enough for every adapter of the layer
            r_max = max(s.r for s in specs.values())
            self._allocate(len(specs), layer.in_dim, layer.out_dim, r_max, first.dtype, first.device)
        if m_params and self.dora is None:
            self.dora = self.a.new_ones((self.capacity + 1, layer.out_dim))
        for name in names:
            a, b, m = a_params[name], b_params[name], m_params.get(name)
            old = self.seen.get(name)
            # DoRA's scale also depends on W0, so W0's version is part of its key.
            m_key = None if m is None else (m._version, layer._weight_2d()._version)
            if (
                old is not None
                and old[0] is a
                and old[1] is b
                and old[2] is m
                and old[3] == a._version
                and old[4] == b._version
                and old[5] == m_key
                and old[6] == specs[name].scale
            ):
                continue
            self._write(layer, name, self._slot_for(name, layer))
            self.seen[name] = (a, b, m, a._version, b._version, m_key, specs[name].scale)

    def _allocate(self, count: int, k: int, d: int, r_max: int, dtype: torch.dtype, device: torch.device) -> None:
        capacity = max(count, self.reserved)
        self.a = torch.zeros((capacity + 1, r_max, k), dtype=dtype, device=device)
        self.b_t = torch.zeros((capacity + 1, r_max, d), dtype=dtype, device=device)
        self.dora = None
        self.slot, self.seen, self.free = {}, {}, list(range(capacity, 0, -1))

    def _slot_for(self, name: str, layer) -> int:
        if name in self.slot:
            return self.slot[name]
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
            a[: spec.r].copy_(layer.lora_A._parameters[name].reshape(spec.r, -1))
            b_t[: spec.r].copy_(layer.lora_B._parameters[name].reshape(-1, spec.r).t()).mul_(spec.scale)
            if spec.r < a.shape[0]:  # zero the padding (a reused slot may hold an older, larger adapter)
                a[spec.r :].zero_()
                b_t[spec.r :].zero_()
            if self.dora is not None:
                self.dora[slot] = layer.dora_scale(name) if name in layer.lora_magnitude else 1.0

    def _release(self, name: str) -> None:
        slot = self.slot.pop(name)
        self.seen.pop(name, None)
        self.a[slot].zero_()
        self.b_t[slot].zero_()
        if self.dora is not None:
            self.dora[slot] = 1.0
        self.free.append(slot)


def _differentiable_stack(layer, names: list[str]) -> tuple[dict[str, int], Tensor, Tensor, Tensor | None]:
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
    if any(n in layer.lora_magnitude for n in names):
        ones = a_rows[0].new_ones(layer.out_dim)
        dora = torch.stack([ones] + [layer.dora_scale(n) if n in layer.lora_magnitude else ones for n in names])
    return {n: i + 1 for i, n in enumerate(names)}, torch.stack(a_rows), torch.stack(b_rows).transpose(1, 2), dora


def reserve(layer, slots: int) -> None:
    """Make room for `slots` adapters in `layer`'s stack now, so later loads never pay for growth."""
    if layer._row_stack is None:
        layer._row_stack = SlotStack()
    stack = layer._row_stack
    stack.reserved = max(stack.reserved, slots)
    while stack.a is not None and stack.capacity < slots:
        stack._grow()


def stacked(layer, used: list[str] | None = None) -> tuple[dict[str, int], Tensor, Tensor, Tensor | None]:
    """(slot of each adapter, A stack, (s·B)ᵀ stack, DoRA scales or None) for `layer`.

    `used` (default: all) names the adapters a batch needs; if gradients must reach any of them
    the result is a fresh differentiable stack of just those, else the persistent synced stack.
    """
    used = list(layer.specs) if used is None else [n for n in used if n in layer.specs]
    if torch.is_grad_enabled() and any(layer.lora_A[n].requires_grad or layer.lora_B[n].requires_grad for n in used):
        return _differentiable_stack(layer, used)
    if layer._row_stack is None:
        layer._row_stack = SlotStack()
    stack = layer._row_stack
    stack.sync(layer, used)
    if stack.a is None:  # no adapters at all
        weight = layer._weight_2d()
        return {}, weight.new_zeros((1, 1, layer.in_dim)), weight.new_zeros((1, 1, layer.out_dim)), None
    return stack.slot, stack.a, stack.b_t, stack.dora


_SHARED_INDEX: dict[tuple, RowIndex] = {}


class RowIndex:
    """Each row's slot, plus the index tensors the one-token-per-row kernels need (built lazily)."""

    def __init__(self, key: tuple[tuple[int, ...], torch.device, int, int]):
        self.key = key
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


def row_slots(
    layer, slot: dict[str, int], batch: int, device: torch.device, r_max: int = 0, slots_total: int = 0
) -> RowIndex:
    """Each row's slot (0 = base only), cached while the batch's layout stays the same."""
    if layer.merged is not None:
        raise LorakitError(f"adapter '{layer.merged}' is merged; call lorakit.unmerge(model) before per-row routing")
    rows = layer.row_adapters
    if rows is None or len(rows) != batch:
        raise LorakitError(
            f"per_row was given {0 if rows is None else len(rows)} adapter names but the batch has {batch} rows; "
            "pass one name (or None) per row"
        )
    key = (tuple([slot.get(n, 0) for n in rows]), device, r_max, slots_total)
    cached = layer._row_slots
    if cached is None or cached.key != key:
        # Layers with the same adapters share one index: built once per batch layout, not per layer.
        cached = _SHARED_INDEX.get(key)
        if cached is None:
            if len(_SHARED_INDEX) >= 16:
                _SHARED_INDEX.clear()
            cached = _SHARED_INDEX[key] = RowIndex(key)
        layer._row_slots = cached
    return cached


def _route(layer, batch: int, device: torch.device):
    """(row index, A stack, (s·B)ᵀ stack, DoRA) or None when no row uses an adapter of this layer."""
    rows = layer.row_adapters
    if rows is not None and len(rows) == batch and not any(n in layer.specs for n in rows):
        if layer.merged is not None:
            raise LorakitError(
                f"adapter '{layer.merged}' is merged; call lorakit.unmerge(model) before per-row routing"
            )
        return None
    used = list(dict.fromkeys(n for n in rows or () if n is not None))
    slot, a, b_t, dora = stacked(layer, used)
    return row_slots(layer, slot, batch, device, a.shape[1], a.shape[0]), a, b_t, dora


def _delta_decode(index: RowIndex, x2: Tensor, a: Tensor, b_t: Tensor) -> Tensor:
    """One token per row: SDDMM for x·A[slot]ᵀ, then embedding_bag for ·(s·B)ᵀ[slot]; no copies."""
    pattern, flat = index.decode_indices()
    r_max = a.shape[1]
    xa = torch.sparse.sampled_addmm(pattern, x2, a.reshape(-1, a.shape[2]).t(), beta=0.0).values().view(-1, r_max)
    return F.embedding_bag(flat, b_t.reshape(-1, b_t.shape[2]), per_sample_weights=xa, mode="sum")


def linear_rows(layer, x: Tensor, out: Tensor) -> Tensor:
    """Linear / Conv1D: out_b + x_b·A[slot_b]ᵀ·(s·B)ᵀ[slot_b] (DoRA: rescaled per output row)."""
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
        delta = _delta_decode(index, x3[:, 0], a, b_t).view(out.shape)
    else:
        xa = torch.bmm(x3, a.index_select(0, index.slots).transpose(1, 2))  # (rows, tokens, r_max)
        b_rows = b_t.index_select(0, index.slots)  # (rows, r_max, d)
        out3 = out.reshape(rows, -1, out.shape[-1])
        if dora is None and out3.dtype == xa.dtype:
            return torch.baddbmm(out3, xa, b_rows).view(out.shape)  # the add fused into the matmul
        delta = torch.bmm(xa, b_rows).view(out.shape)
    return _add_rows(layer, out, delta, dora, index)


def _add_rows(layer, out: Tensor, delta: Tensor, dora: Tensor | None, index: RowIndex) -> Tensor:
    """out + delta, or with DoRA (some rows' g ≠ 1): out + (g_b - 1)·(out - bias) + g_b·delta, channels last."""
    if dora is None:
        return out + delta.to(out.dtype)
    g = dora.index_select(0, index.slots).view(out.shape[0], *([1] * (out.dim() - 2)), -1)
    bias = getattr(layer.base_layer, "bias", None)
    base = out if bias is None else out - bias
    return out + ((g - 1) * base + g * delta).to(out.dtype)


def embedding_rows(layer, ids: Tensor, out: Tensor) -> Tensor:
    """Embedding: out_b + A[slot_b][:, ids_b]ᵀ·(s·B)ᵀ[slot_b]; the lookup replaces the first matmul."""
    rows = ids.shape[0]
    route = _route(layer, rows, ids.device)
    if route is None:
        return out
    index, a, b_t, dora = route
    xa = a[index.slots[:, None], :, ids.reshape(rows, -1)]  # (rows, tokens, r_max)
    delta = torch.bmm(xa, b_t.index_select(0, index.slots)).view(out.shape)
    return _add_rows(layer, out, delta, dora, index)


def conv_rows(layer, x: Tensor, out: Tensor) -> Tensor:
    """Convolutions have no batched-weight kernel: the rows are grouped by adapter instead, and each
    group gets exactly the term that adapter adds alone (LoRA's or DoRA's)."""
    rows = layer.row_adapters
    if rows is None or len(rows) != x.shape[0]:
        row_slots(layer, {}, x.shape[0], x.device)  # raises the clear error
    if layer.merged is not None:
        raise LorakitError(f"adapter '{layer.merged}' is merged; call lorakit.unmerge(model) before per-row routing")
    result = out
    for name in dict.fromkeys(n for n in rows if n in layer.specs):
        index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
        xs = x[index]
        term = layer.dora_term(xs, out[index], name) if layer.specs[name].use_dora else layer._low_rank(xs, name)
        result = result.index_add(0, index, term.to(out.dtype))
    return result
