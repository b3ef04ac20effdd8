"""A preallocated (static) KV cache for a batch of rows of different lengths that join and leave.

Each attention layer keeps two buffers, keys and values, of shape (row capacity, kv heads,
column capacity, head dim), and one boolean mask (row capacity, column capacity) says which
cells hold a real token. The live region is rows [0, n) and columns [start, end): every row's
tokens are right-aligned at `end` (left-padded), so one decode step writes column `end` for all
rows at once and attention reads the views

    K[:n, :, start:end+1],  V[:n, :, start:end+1],  mask[:n, start:end+1]

A step costs one column write per layer: nothing of the past is copied (transformers' DynamicCache
concatenates, copying the whole cache every token). Rows join by copying their prefill cache into
free rows (`add_rows`), leave by compaction (`keep_rows`), and columns that are padding in every
row left are dropped by moving `start`. When the buffer runs out of rows or columns it is
reallocated with room for the longest remaining request (`room`), so a request's cache is
normally allocated once. Cells outside a row's real tokens hold zeros or stale finite values and
are masked: attention gives them weight exactly 0, so every row computes what it would alone.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

COLUMN_BLOCK = 64  # columns are allocated in multiples of this


class _Layer(DynamicLayer):
    """transformers' per-layer cache interface over one layer's slice of the buffers."""

    def __init__(self, owner: StaticKV, index: int):
        super().__init__()
        self.owner, self.index, self.is_initialized = owner, index, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.keys, self.values = self.owner.write(self.index, key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.end - self.owner.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class StaticKV(Cache):
    """The running batch's KV cache; `rows` live rows, columns [start, end)."""

    def __init__(self, num_layers: int):
        """Buffers are allocated by the first `add_rows`, shaped like its keys and values."""
        super().__init__(layers=[_Layer(self, i) for i in range(num_layers)])
        self.key_buffers: list[Tensor] = []
        self.value_buffers: list[Tensor] = []
        self.cells: Tensor | None = None  # which cells hold a real token
        self.rows = self.start = self.end = 0

    # ----- what attention reads and writes ----------------------------------------------
    @property
    def window(self) -> Tensor:
        """The live rows' mask over the live columns (rows x (end - start))."""
        return self.cells[: self.rows, self.start : self.end]

    @property
    def padded(self) -> bool:
        """Whether any live cell is padding (else attention needs no mask)."""
        return not bool(self.window.all())

    def open_column(self) -> Tensor:
        """Mark column `end` real for every live row (the token the next step writes); the step's mask."""
        if self.end >= self.cells.shape[1]:  # out of columns (`room` was too small): move and grow
            self._relayout(self.rows, self.end - self.start, COLUMN_BLOCK)
        self.cells[: self.rows, self.end] = True
        return self.cells[: self.rows, self.start : self.end + 1]

    def write(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store the step's keys/values (rows x heads x q x dim) at columns [end, end + q); return the views
        attention reads, up to and including them. `advance(q)` moves `end` once every layer has written."""
        q = keys.shape[2]
        stop = self.end + q
        k, v = self.key_buffers[layer], self.value_buffers[layer]
        k[: self.rows, :, self.end : stop] = keys
        v[: self.rows, :, self.end : stop] = values
        return k[: self.rows, :, self.start : stop], v[: self.rows, :, self.start : stop]

    def advance(self, q: int = 1) -> None:
        self.end += q

    # ----- rows joining and leaving -----------------------------------------------------
    def add_rows(self, keys: list[Tensor], values: list[Tensor], mask: Tensor, room: int) -> None:
        """Append rows from a prefill (per layer: new rows x heads x P x dim, left-padded; `mask` new rows x P),
        keeping `room` free columns after `end` for the tokens still to come."""
        if self.cells is None:  # empty buffers shaped like each layer's (grown below)
            self.key_buffers = [k.new_zeros((1, k.shape[1], 0, k.shape[3])) for k in keys]
            self.value_buffers = [v.new_zeros((1, v.shape[1], 0, v.shape[3])) for v in values]
            self.cells = torch.zeros((1, 0), dtype=torch.bool, device=mask.device)
        new, length = mask.shape
        rows, width = self.rows + new, max(self.end - self.start, length)
        if rows > self.cells.shape[0] or self.end < width or self.end + room > self.cells.shape[1]:
            self._relayout(rows, width, room)
        start, end = self.end - width, self.end
        self.cells[: self.rows, start : self.start] = False  # columns joining the window are padding for old rows
        self.cells[self.rows : rows, start:end] = False
        self.cells[self.rows : rows, end - length : end] = mask.bool()
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.key_buffers[layer][self.rows : rows, :, end - length : end] = k
            self.value_buffers[layer][self.rows : rows, :, end - length : end] = v
        self.rows, self.start = rows, start

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order), moved to the front; drop columns now padding in every row."""
        index = torch.tensor(keep, device=self.cells.device)
        live = slice(self.start, self.end)
        count = len(keep)
        for buffers in (self.key_buffers, self.value_buffers):
            for buffer in buffers:
                buffer[:count, :, live] = buffer[: self.rows, :, live].index_select(0, index)
        self.cells[:count, live] = self.cells[: self.rows, live].index_select(0, index)
        self.rows = count
        if count:
            self.start += int(self.window.any(0).long().argmax())

    # ----- storage ------------------------------------------------------------------------
    def _relayout(self, rows: int, width: int, room: int) -> None:
        """New buffers for `rows` rows and `width + room` columns; the live region moved to end at `width`."""
        old_rows, old_start, old_end = self.rows, self.start, self.end
        row_cap = self.cells.shape[0] if rows <= self.cells.shape[0] else max(rows, 2 * self.cells.shape[0])
        col_cap = -(-(width + room) // COLUMN_BLOCK) * COLUMN_BLOCK
        live = old_end - old_start
        for buffers in (self.key_buffers, self.value_buffers):
            for i, old in enumerate(buffers):
                buffers[i] = old.new_zeros((row_cap, old.shape[1], col_cap, old.shape[3]))
                buffers[i][:old_rows, :, width - live : width] = old[:old_rows, :, old_start:old_end]
        mask = torch.zeros((row_cap, col_cap), dtype=torch.bool, device=self.cells.device)
        mask[:old_rows, width - live : width] = self.cells[:old_rows, old_start:old_end]
        self.cells, self.start, self.end = mask, width - live, width
