"""Length groups: a partition of the micro-batch whose padded cost is the true minimum (brute force),
and training with them gives the same update as one padded pass."""

import random

import pytest
import torch

from lorakit.train.batches import length_groups


def _cost(groups, lengths, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def _all_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _all_partitions(rest):
        for i in range(len(partition)):
            yield partition[:i] + [[first, *partition[i]]] + partition[i + 1 :]
        yield [[first], *partition]


@pytest.mark.parametrize("seed", range(6))
def test_length_groups_is_an_optimal_partition(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(3, 90) for _ in range(rng.randint(1, 7))]
    overhead = rng.choice([0, 10, 40, 1000])
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    best = min(_cost(p, lengths, overhead) for p in _all_partitions(list(range(len(lengths)))))
    assert _cost(groups, lengths, overhead) == best
    if overhead >= 1000:
        assert len(groups) == 1


def test_grouped_passes_give_the_update_of_one_padded_pass(tiny_models):
    """The token-normalised gradient summed over length groups equals the one-pass gradient."""
    from transformers import AutoModelForCausalLM

    from lorakit.train.data import IGNORE, Example, collate
    from lorakit.train.objective import loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).train()
    g = torch.Generator().manual_seed(0)
    examples = []
    for length in (30, 5, 28, 6, 7, 29):
        ids = torch.randint(0, 290, (length,), generator=g).tolist()
        examples.append(Example(ids, labels=[IGNORE] * 2 + ids[2:]))
    n_targets = sum(e.n_targets for e in examples)
    groups = length_groups([len(e.input_ids) for e in examples], overhead=10)
    assert len(groups) == 2

    def grads(passes):
        model.zero_grad(set_to_none=True)
        for part in passes:
            loss, _, _ = loss_sum(model, collate(part, pad_id=0), "causal-lm")
            (loss / n_targets).backward()
        return [p.grad.clone() for p in model.parameters()]

    one = grads([examples])
    grouped = grads([[examples[i] for i in group] for group in groups])
    for a, b in zip(one, grouped):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
