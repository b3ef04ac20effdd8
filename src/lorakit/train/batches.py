"""Which examples each optimizer step sees: a pure function of (seed, step), so resuming needs only the step.

The data is an endless stream of epochs, each a seeded permutation of the examples. Step t takes
the next G = batch_size x grad_accum x world_size positions of that stream; the step's global
batch is cut into grad_accum micro-batches, and each micro-batch into one slice per process.
Because the loss is normalised by the number of target tokens in the whole global batch, how a
step is cut across processes and micro-batches does not change its gradient.

The same fact lets a micro-batch run as several length groups (`length_groups`): its examples,
sorted by length, are cut where that saves more padded positions than an extra forward and
backward costs. Which examples a step sees, and so what the model learns from a given data
order, does not change at all; only the padding (and the order of a floating-point sum) does.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


class StepPlan:
    def __init__(self, n_examples: int, batch_size: int, grad_accum: int, world_size: int, seed: int):
        self.n = n_examples
        self.batch_size, self.grad_accum, self.world_size, self.seed = batch_size, grad_accum, world_size, seed
        self.global_batch = batch_size * grad_accum * world_size

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.n / self.global_batch))

    def epoch(self, step: int) -> float:
        """Passes over the data completed after `step` steps."""
        return step * self.global_batch / self.n

    @lru_cache(maxsize=4)  # noqa: B019  (a few epochs per sampler; the sampler lives as long as the run)
    def _order(self, epoch: int) -> tuple[int, ...]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return tuple(torch.randperm(self.n, generator=generator).tolist())

    def step_indices(self, step: int) -> list[int]:
        """The example indices of step `step`'s global batch, in stream order."""
        start = step * self.global_batch
        out = []
        for position in range(start, start + self.global_batch):
            out.append(self._order(position // self.n)[position % self.n])
        return out

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This process's grad_accum micro-batches of step `step`."""
        indices = self.step_indices(step)
        per_micro = self.batch_size * self.world_size
        micro = [indices[m * per_micro : (m + 1) * per_micro] for m in range(self.grad_accum)]
        return [chunk[rank * self.batch_size : (rank + 1) * self.batch_size] for chunk in micro]


# Cost of one extra forward + backward, in padded token positions: a group pays its rows x its
# longest length plus this. Measured on SmolLM2-135M (CPU, 2 threads): a pass over 8 rows costs about
# as much as 40 more token positions; for much smaller models the fixed cost weighs more, but
# cutting there saves little time either way.
GROUP_OVERHEAD = 40


def length_groups(lengths: list[int], overhead: int = GROUP_OVERHEAD) -> list[list[int]]:
    """Positions of `lengths`, longest first, cut into consecutive groups that minimise the padded
    positions (rows x longest, summed over groups) plus `overhead` per group (exact, O(n^2))."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = [0] + [None] * len(order)  # best[j]: cheapest cut of order[:j]
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[i]] + overhead
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]
