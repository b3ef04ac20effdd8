"""Rows that begin with the same tokens share that prefix's computation.

Chat data repeats a header in every row (the template's tokens and, often, one system prompt):
in the demo ~21 of ~56 tokens per row. In a causal model the hidden states of the first P
positions depend on those P tokens only, so for rows that agree on their first P tokens

    run the prefix once (1 x P, keeping each layer's keys and values),
    repeat its keys / values across the rows, run the B x (T - P) suffixes on top of them.

The result is the same function of the same weights: every suffix position attends to the
prefix's keys and values exactly as in the full pass (the cache sets positions P.. and the
causal mask); the gradient of the shared keys / values is the sum over rows, as autograd forms it
through the repeat. The prefix's own positions appear once instead of B times in every matmul.

Used only where it is known to hold and to pay: decoder models with the standard key/value cache
(SHARED_PREFIX_MODELS), no DDP wrapper (one forward per backward there), no gradient
checkpointing (the model turns its cache off), no forward pre-hooks on the model's backbone (prefix
tuning fills the cache through one), and only when the rows saved outweigh an extra forward call.
"""

from __future__ import annotations

import torch
from torch import nn

SHARED_PREFIX_MODELS = frozenset({"llama", "qwen2", "qwen3", "gpt2"})
# A second forward call costs about as much as this many token positions (see batches.GROUP_OVERHEAD).
MIN_TOKENS_SAVED = 40


def shared_length(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading positions every row shares (0: run the batch as one pass)."""
    rows, width = input_ids.shape
    if rows < 2 or not cache_usable(model):
        return 0
    if getattr(getattr(model, "config", None), "model_type", None) not in SHARED_PREFIX_MODELS:
        return 0
    core = getattr(model, "base_model", model)
    if core is not model and core._forward_pre_hooks:  # e.g. a prefix-tuning prefix fills the cache
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    length = min(int(same.int().cumprod(0).sum()), width - 1)  # at least one position left per row
    return length if pays(rows, length) else 0


def cache_usable(model: nn.Module) -> bool:
    """Whether a training forward may run through the model's cache: not under DDP (one forward per
    backward there) nor gradient checkpointing (the model recomputes layers and turns its cache off)."""
    return not hasattr(model, "module") and not getattr(model, "is_activation_checkpointing", False)


def pays(rows: int, length: int) -> bool:
    """Whether computing `length` shared positions once for `rows` rows saves more than a second call costs."""
    return (rows - 1) * length > MIN_TOKENS_SAVED


def forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int) -> None:
    """The model on the batch, its first `length` positions computed once (outputs go to the model's
    head as two calls: the prefix's 1 x length positions, then the rows' suffixes)."""
    prefix = model(input_ids=input_ids[:1, :length], attention_mask=attention_mask[:1, :length], use_cache=True)
    cache = prefix.cache
    cache.batch_repeat_interleave(input_ids.shape[0])
    model(input_ids=input_ids[:, length:], attention_mask=attention_mask, cache=cache, use_cache=True)
