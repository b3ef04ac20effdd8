"""The training objective and held-out evaluation, for causal LM and sequence classification.

Losses are *sums* over targets, with the number of targets returned beside them, so a trainer
can divide by the target count of a whole step (all micro-batches, all processes): gradient
accumulation then gives exactly the gradient of one big batch, token-weighted.

Causal LM: position t predicts token t+1; only positions with a target reach the output head.
For the usual plain-linear heads the head is skipped inside the model (its input is kept) and
run fused with the loss on the target rows only (head_loss.py): no batch x length x vocab logits
are ever formed, and a short completion costs a few rows of the head instead of every position.
Rows that start with the same tokens (a chat header, a system prompt) compute them once (shared_prefix.py).
Training micro-batches of the usual decoders run packed instead (packing.py): examples end to end in
few rows, each attending to itself only, the shared head once, no padding and one forward call.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import packing, shared_prefix
from .data import IGNORE, Example, collate
from .head_loss import linear_cross_entropy

# Causal-LM heads known to be a plain linear map to the logits (no soft-capping or logit scaling
# after it), for which the head can be run on the target positions only, fused with the loss.
PLAIN_HEAD_MODELS = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi", "phi3", "olmo", "olmo2", "gemma", "starcoder2"}
)


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head if the loss may be computed from its input directly (fused), else None."""
    inner = getattr(model, "module", model)  # DDP
    get_head = getattr(inner, "get_output_embeddings", None)
    if get_head is None or getattr(getattr(inner, "config", None), "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    head = get_head()
    return head if type(head) is nn.Linear else None  # a LoRA-wrapped or saved head runs as the model says


@contextlib.contextmanager
def _capture_head_input(head: nn.Linear):
    """Within the block the head returns an empty tensor and keeps its input (the last hidden states)."""
    seen: list[torch.Tensor] = []

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(hidden)
        return hidden[..., :0]

    head.forward = capture
    try:
        yield seen
    finally:
        del head.forward


def _last_hidden(model: nn.Module, inputs: dict[str, torch.Tensor], head: nn.Linear) -> torch.Tensor:
    """The hidden states the head would see (batch x length x hidden), a shared prefix computed once."""
    shared = shared_prefix.shared_length(model, inputs["input_ids"], inputs["attention_mask"])
    with _capture_head_input(head) as seen:
        if shared:
            shared_prefix.forward(model, inputs["input_ids"], inputs["attention_mask"], shared)
        else:
            model(**inputs)
    if len(seen) == 1:
        return seen[0]
    start, rest = seen
    return torch.cat([start.expand(rest.shape[0], -1, -1), rest], dim=1)


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum of per-target losses, number of correct predictions, number of targets) for one batch."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task == "seq-cls":
        logits = model(**inputs).logits.float()
        targets = batch["labels"]
        correct = (logits.argmax(-1) == targets).sum()
        return F.cross_entropy(logits, targets, reduction="sum"), correct, targets.numel()
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    head = _plain_head(model)
    if head is None:
        logits = model(**inputs).logits[:, :-1][mask].float()
        flat = targets[mask]
        loss = F.cross_entropy(logits, flat, reduction="sum")
        return loss, (logits.argmax(-1) == flat).sum(), int(flat.numel())
    hidden = _last_hidden(model, inputs, head)[:, :-1][mask]  # position t predicts token t+1: targets only
    loss, correct = linear_cross_entropy(hidden, head.weight, head.bias, targets[mask])
    return loss, correct, int(mask.sum())


def packs(model: nn.Module, task: str) -> bool:
    """Whether training batches of `model` run as packed rows (packing.py) rather than padded."""
    return task == "causal-lm" and _plain_head(model) is not None and packing.applies(model)


def packed_loss_sum(model: nn.Module, examples: list[Example], pad_id: int, device: torch.device) -> torch.Tensor:
    """The sum of per-target losses of `examples` run as packed rows (only where `packs`)."""
    return packing.loss_sum(model, examples, pad_id, _plain_head(model), _capture_head_input, device)[0]


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
