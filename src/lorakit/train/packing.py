"""Packed rows: a micro-batch's examples laid end to end, each attending only to itself.

Padding every example to the longest wastes positions; cutting a batch into length groups costs a
forward call per group. For causal LM a micro-batch instead runs as

    shared head  the first P tokens every example starts with (a chat template's header, a system
                 prompt), once, as one row whose keys and values every packed row attends to
    rows         each example's remaining tokens end to end, first-fit into rows of <= R tokens
    positions    restarted per example (P, P+1, ...): each token sits where it sits when alone
    mask         a token of example e attends to the shared head and to the earlier tokens of e

so every position computes exactly what it computes when its example runs alone (the same
function of the same weights): the loss, a sum over target tokens, and its gradient equal the
per-example ones up to the order of floating-point sums. Position t of an example predicts its
token t+1, never the next example's first token; only target positions reach the head (fused with
the loss, head_loss.py). The rows of one call are padded to the longest; a padding position
attends to itself only and has no target.

Used where a model is known to take per-token position ids and a 4-D mask as given
(PACKED_MODELS; attention "sdpa", which takes a boolean mask, or "eager", an additive one); not
with prefix tuning (its hook fills the cache). The shared head needs the model's cache, so it is
off under DDP (one forward per backward there) and gradient checkpointing (no cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import shared_prefix
from .data import IGNORE, Example
from .head_loss import linear_cross_entropy

PACKED_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"})
ATTENTION = frozenset({"sdpa", "eager"})
# A packed row holds at most max(longest example, ROW_TOKENS) tokens: attention inside a row is
# computed for every pair (masked), so very long rows would waste more than padding did.
ROW_TOKENS = 256


@dataclass
class Packed:
    """One micro-batch laid out for a single forward call (plus the shared head's)."""

    head_ids: torch.Tensor  # 1 x P, the tokens every example starts with (P may be 0)
    input_ids: torch.Tensor  # rows x width
    position_ids: torch.Tensor  # rows x width
    allowed: torch.Tensor  # rows x 1 x width x (P + width), True where a query may attend
    hidden_index: torch.Tensor  # N: target positions in cat(head positions, flattened rows)
    targets: torch.Tensor  # N


def _core(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def applies(model: nn.Module) -> bool:
    """Whether `model`'s micro-batches may run packed."""
    core = _core(model)
    config = getattr(core, "config", None)
    if getattr(config, "model_type", None) not in PACKED_MODELS:
        return False
    if getattr(config, "_attn_implementation", None) not in ATTENTION:
        return False
    backbone = getattr(core, "base_model", core)
    return not (backbone is not core and backbone._forward_pre_hooks)  # prefix tuning


def _shared_length(model: nn.Module, examples: list[Example]) -> int:
    """Leading tokens all examples share (each keeps at least one of its own); 0 where not worth a call."""
    if len(examples) < 2 or not shared_prefix.cache_usable(model):
        return 0
    first, limit = examples[0].input_ids, min(len(e.input_ids) for e in examples) - 1
    length = 0
    while length < limit and all(e.input_ids[length] == first[length] for e in examples):
        length += 1
    return length if shared_prefix.pays(len(examples), length) else 0


def _rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices per row: first fit, longest first."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([]), room.append(capacity)
            fit = len(rows) - 1
        rows[fit].append(i)
        room[fit] -= lengths[i]
    return rows


def pack(examples: list[Example], shared: int, pad_id: int) -> Packed:
    """Lay `examples` out as Packed, their first `shared` tokens as the shared head."""
    own = [len(e.input_ids) - shared for e in examples]
    rows = _rows(own, max(max(own), ROW_TOKENS))
    width = max(sum(own[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    owner = -1 - torch.arange(width).repeat(len(rows), 1)  # padding: an owner of its own
    index, targets = [], []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            e, n = examples[i], own[i]
            ids[r, start : start + n] = torch.tensor(e.input_ids[shared:])
            positions[r, start : start + n] = torch.arange(shared, shared + n)
            owner[r, start : start + n] = i
            for t, target in enumerate(e.labels[1:]):  # position t predicts token t + 1
                if target != IGNORE:
                    index.append(t if t < shared else shared + r * width + start + t - shared)
                    targets.append(target)
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (owner[:, :, None] == owner[:, None, :]) & causal
    head = (owner >= 0)[:, :, None].expand(-1, -1, shared)
    return Packed(
        torch.tensor([examples[0].input_ids[:shared]], dtype=torch.long),
        ids,
        positions,
        torch.cat([head, allowed], dim=2)[:, None],
        torch.tensor(index, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
    )


def _mask(model: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """The 4-D mask in the form the model's attention takes: boolean (sdpa) or additive (eager)."""
    core = _core(model)
    if core.config._attn_implementation == "sdpa":
        return allowed
    dtype = next(p.dtype for p in core.parameters() if p.is_floating_point())
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def loss_sum(
    model: nn.Module, examples: list[Example], pad_id: int, head: nn.Linear, capture, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum of per-target losses, correct predictions, targets) of `examples` run packed; `capture`
    is objective's context that makes the head return nothing and keep its input."""
    packed = pack(examples, _shared_length(model, examples), pad_id)
    ids, positions = packed.input_ids.to(device), packed.position_ids.to(device)
    mask = _mask(model, packed.allowed).to(device)
    shared = packed.head_ids.shape[1]
    with capture(head) as seen:
        if shared:
            cache = model(input_ids=packed.head_ids.to(device), use_cache=True).cache
            cache.batch_repeat_interleave(ids.shape[0])
            model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True)
        else:
            model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False)
    hidden = torch.cat([state.reshape(-1, state.shape[-1]) for state in seen])
    targets = packed.targets.to(device)
    loss, correct = linear_cross_entropy(hidden[packed.hidden_index.to(device)], head.weight, head.bias, targets)
    return loss, correct, int(targets.numel())
