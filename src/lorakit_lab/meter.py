"""Measuring a training step: memory (accounted tensor by tensor, and the process's real peak) and time.

Two memory numbers, because each answers a different question:

* accounted = weights + gradients + optimizer state + activations saved for backward, summed over
  the actual tensors (each storage once). This is what a GPU allocator holds at the peak of a step
  and what the "3x less GPU memory" claim is about; it does not depend on the machine.
* measured = the process's peak resident memory during the steps (Linux VmHWM, reset through
  /proc/self/clear_refs) above its level just before, after glibc has given freed pages back.
  It adds what accounting misses (temporaries, allocator slack) and is None where Linux's
  counters are unavailable.
"""

from __future__ import annotations

import ctypes
import gc
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _release_free_memory() -> None:
    gc.collect()
    try:  # hand glibc's free heap pages back to the OS so the baseline is live memory only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """`with PeakMemory() as peak: ...` then `peak.rise` = bytes above the starting level (or None)."""

    def __enter__(self) -> PeakMemory:
        _release_free_memory()
        self.start = _status_kb("VmRSS")
        self.rise: int | None = None
        try:
            _CLEAR_REFS.write_text("5")  # "5" resets the high-water mark to the current RSS
            self.ok = self.start is not None
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kb("VmHWM")
        if self.ok and peak is not None:
            self.rise = max(0, peak - self.start)


def unique_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of weights, of gradients (one per trainable weight) and of the optimizer's state."""
    params = list(model.parameters())
    opt_tensors = []
    if optimizer is not None:
        for state in optimizer.state.values():
            opt_tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "weights": unique_bytes(iter(params)),
        "grads": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        "optimizer": unique_bytes(iter(opt_tensors)),
    }


def activation_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during `forward()` (parameters excluded)."""
    param_keys = {(p.untyped_storage().data_ptr()) for p in model.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in param_keys:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    total = unique_bytes(iter(saved))
    saved.clear()  # let autograd's graph and its tensors go
    del loss
    return total


@contextmanager
def timed() -> Iterator[dict]:
    """`with timed() as t: ...` then t["seconds"]."""
    box = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start


def accounted_total(parts: dict[str, int]) -> int:
    return sum(parts[k] for k in ("weights", "grads", "optimizer", "activations") if k in parts)
