"""One pre-training run of pretrain-limits: train a fresh model with one method, measure it as it goes.

Per run it records the training loss of every step, the held-out loss and the rank of the learned
update at a few evenly spaced steps (so gaps can be read against tokens seen, not only at the end),
the memory of a step (accounted tensor by tensor, and the process's measured peak) and its time.

The rank of the update is rank90(W_t - W_0): the fewest singular directions that hold 90% of
||W_t - W_0||_F^2 (spectra.energy_rank), averaged over the attention and MLP matrices. A LoRA
adapter's update s·B·A can never exceed rank r; a full-rank update can reach min(m, n).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from . import corpora
from .galore import cosine_schedule
from .meter import PeakMemory, accounted_total, activation_bytes, state_bytes
from .pretrain_arches import active_parameters, language_loss
from .pretrain_methods import Method, Rates, Size, base_weights, block_matrices, build_model, configure
from .relora import jagged_factor, merge_and_restart
from .spectra import energy_rank


@dataclass(frozen=True)
class Budget:
    steps: int
    batch: int
    context: int
    eval_points: int
    relora_every: int
    ckpt_steps: int
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.context


@torch.no_grad()
def held_out_loss(model: nn.Module, windows: torch.Tensor, batch: int) -> float:
    """Mean next-byte cross-entropy (nats) over fixed held-out windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        total += language_loss(model(input_ids=chunk, labels=chunk), model).item() * len(chunk)
    model.train(was_training)
    return total / len(windows)


def roughness(losses: list[float]) -> float:
    """Mean |step-to-step change| of the training loss over the second half: noise, spikes, restarts."""
    tail = losses[len(losses) // 2 :]
    return sum(abs(b - a) for a, b in zip(tail, tail[1:])) / max(1, len(tail) - 1)


def update_rank(start: dict[str, torch.Tensor], model: nn.Module) -> float:
    """Mean rank90(W_now - W_start) over the block matrices."""
    now = block_matrices(model)
    ranks = [energy_rank(now[k] - start[k], 0.9) for k in start]
    return sum(ranks) / len(ranks)


def frozen_drift(before: dict[str, torch.Tensor], model: nn.Module) -> float:
    """Largest |change| of any weight that does not train (0.0 when freezing held)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    after = base_weights(model)
    moved = [(after[n] - before[n]).abs().max().item() for n in before if n in frozen and n in after]
    return max(moved, default=0.0)


def run_one(
    size: Size,
    method: Method,
    rates: Rates,
    budget: Budget,
    corpus: corpora.Corpus,
    windows: torch.Tensor,
    bar: tqdm | None = None,
) -> dict:
    """Train `size` from its seeded random init with `method`; return the measurements."""
    model = build_model(size, budget.context, budget.seed, method)
    start = block_matrices(model)
    total_params = sum(p.numel() for p in model.parameters())
    active = active_parameters(model)
    optimizer = configure(model, method, rates, budget.seed)
    initial = base_weights(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    steps = budget.ckpt_steps if method.checkpointing else budget.steps
    lr0 = {id(g): g["lr"] for g in optimizer.param_groups}
    batches = torch.Generator().manual_seed(budget.seed + 1)  # every method sees the same batches
    restart_gen = torch.Generator().manual_seed(budget.seed + 2)
    warmup = max(1, steps // 10)
    eval_at = {round(steps * (i + 1) / budget.eval_points) - 1 for i in range(budget.eval_points)}
    losses, evals, ranks, times, restarts = [], [], [], [], 0
    with PeakMemory() as peak:
        for step in range(steps):
            factor = cosine_schedule(step, steps, warmup)
            if method.kind == "relora":
                factor *= jagged_factor(step, budget.relora_every, max(2, budget.relora_every // 10))
            for g in optimizer.param_groups:
                g["lr"] = lr0[id(g)] * factor
            batch = corpus.batch("train", budget.batch, budget.context, batches)
            began = time.perf_counter()
            output = model(input_ids=batch, labels=batch)
            output.loss.backward()  # an MoE's includes the router's load-balancing term
            loss = language_loss(output, model)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep grads allocated: what a training step really holds
            times.append(time.perf_counter() - began)
            losses.append(loss.item())
            if method.kind == "relora" and (step + 1) % budget.relora_every == 0 and step + 1 < steps:
                merge_and_restart(model, "default", optimizer, restart_gen)
                restarts += 1
            if bar is not None:
                bar.update(1)
            if not math.isfinite(losses[-1]):
                break
            if step in eval_at and not method.checkpointing:
                evals.append((step + 1, held_out_loss(model, windows, budget.batch)))
                ranks.append((step + 1, update_rank(start, model)))
    if bar is not None and len(losses) < steps:
        bar.update(steps - len(losses))
    memory = state_bytes(model, optimizer)
    probe = corpus.batch("train", budget.batch, budget.context, torch.Generator().manual_seed(0))
    memory["activations"] = activation_bytes(model, lambda: model(input_ids=probe, labels=probe).loss)
    result = {
        "size": size.name,
        "hidden": size.hidden,
        "method": method.key,
        "kind": method.kind,
        "rank": method.rank,
        "params": total_params,
        "active_params": active,
        "arch": method.arch,
        "seed": budget.seed,
        "trainable": trainable,
        "steps": steps,
        "tokens": steps * budget.batch * budget.context,
        "step_seconds": sum(times[2:]) / max(1, len(times) - 2) if len(times) > 2 else sum(times) / len(times),
        "memory": memory,
        "memory_accounted": accounted_total(memory),
        "measured_rss_rise": peak.rise,
        "restarts": restarts,
        "frozen_drift": frozen_drift(initial, model),
    }
    if method.checkpointing:
        return result
    diverged = not math.isfinite(losses[-1])
    final = evals[-1][1] if evals and not diverged else float("nan")
    result.update(
        {
            "train_loss": losses,
            "eval_curve": evals,
            "rank_curve": ranks,
            "diverged": diverged,
            "held_out_loss": final,
            "held_out_ppl": math.exp(final) if math.isfinite(final) else float("nan"),
            "roughness": roughness(losses),
            "update_rank90_mean": ranks[-1][1] if ranks else float("nan"),
            "update_rank_max_possible": sum(min(w.shape) for w in start.values()) / len(start),
        }
    )
    return result
