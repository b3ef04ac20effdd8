"""The training objective and held-out evaluation, for causal LM and sequence classification.

Losses are *sums* over targets, with the number of targets returned beside them, so a trainer
can divide by the target count of a whole step (all micro-batches, all processes): gradient
accumulation then gives exactly the gradient of one big batch, token-weighted.

Causal LM: position t predicts token t+1; only positions with a target reach the output head
(`logits_to_keep`), which skips most of the vocabulary projection when the loss is on a short
completion.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE, Example, collate


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP
    cached = inner.__dict__.get("_lorakit_logits_to_keep")
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(inner.forward).parameters
        inner.__dict__["_lorakit_logits_to_keep"] = cached
    return cached


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum of per-target losses, number of correct predictions, number of targets) for one batch."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task == "seq-cls":
        logits = model(**inputs).logits.float()
        targets = batch["labels"]
        correct = (logits.argmax(-1) == targets).sum()
        return F.cross_entropy(logits, targets, reduction="sum"), correct, targets.numel()
    targets = batch["labels"][:, 1:]
    positions = (targets != IGNORE).any(0).nonzero().squeeze(1)
    if _accepts_logits_to_keep(model) and positions.numel() < targets.shape[1]:
        logits = model(**inputs, logits_to_keep=positions).logits
        targets = targets[:, positions]
    else:
        logits = model(**inputs).logits[:, :-1]
    logits = logits.float()
    flat_targets = targets.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_targets, ignore_index=IGNORE, reduction="sum")
    mask = flat_targets != IGNORE
    correct = (logits.reshape(-1, logits.shape[-1]).argmax(-1)[mask] == flat_targets[mask]).sum()
    return loss, correct, int(mask.sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[Example],
    task: str,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    progress=None,
) -> dict[str, float]:
    """Held-out metrics: {"loss", "perplexity"} (causal LM, token-averaged) or {"loss", "accuracy"}.

    Under several processes each takes every world_size-th example and the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    shard = examples[rank::world_size]
    # Similar lengths together: less padding, same result.
    shard = sorted(shard, key=lambda e: len(e.input_ids))
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, len(shard), batch_size):
        batch = {k: v.to(device) for k, v in collate(shard[start : start + batch_size], pad_id).items()}
        loss, correct, count = loss_sum(model, batch, task)
        totals += torch.tensor([loss.item(), correct.item(), count], dtype=torch.float64, device=device)
        if progress is not None:
            progress.update(len(shard[start : start + batch_size]))
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    loss_total, correct, count = totals.tolist()
    loss = loss_total / max(count, 1)
    if task == "seq-cls":
        return {"loss": loss, "accuracy": correct / max(count, 1)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
