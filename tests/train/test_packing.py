"""Packed rows against each example run alone through the plain model (full logits, plain
cross-entropy): the same loss, hits and gradients of every parameter, with and without a shared
head, with one row or several (padded), for sdpa's boolean and eager's additive masks."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_decoder

from lorakit.train import packing, shared_prefix
from lorakit.train.data import IGNORE, Example
from lorakit.train.objective import _capture_head_input, _plain_head

VOCAB = 96


def _llama(attention: str, tied: bool = True):
    return tiny_decoder("llama", vocab=VOCAB, tie_word_embeddings=tied, attn_implementation=attention).train()


def _qwen2(attention: str):
    return tiny_decoder("qwen2", vocab=VOCAB, attn_implementation=attention).train()


def _examples(shared: int, seed: int = 3) -> list[Example]:
    """Examples of 1-14 own tokens after `shared` common ones; targets from inside the shared head on,
    one with a single target, one with its targets right after the head."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, VOCAB, (shared,), generator=g).tolist()
    examples = []
    for extra, prompt in ((6, shared + 2), (1, max(shared - 1, 1)), (14, shared), (4, shared + 3), (9, 1)):
        ids = head + torch.randint(0, VOCAB, (extra,), generator=g).tolist()
        examples.append(Example(ids, labels=[IGNORE] * prompt + ids[prompt:]))
    examples[1].labels = [IGNORE] * (len(examples[1].input_ids) - 1) + [examples[1].input_ids[-1]]
    return examples


def _alone(model, examples):
    """Reference: each example alone, the model's own full logits, plain cross-entropy, summed."""
    model.zero_grad(set_to_none=True)
    total, correct, count = 0.0, 0, 0
    for e in examples:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].float()
        targets = torch.tensor(e.labels[1:], dtype=torch.long)
        keep = targets != IGNORE
        loss = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
        loss.backward()
        total += loss.item()
        correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
        count += int(keep.sum())
    return total, correct, count, {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed(model, examples):
    model.zero_grad(set_to_none=True)
    head = _plain_head(model)
    loss, correct, count = packing.loss_sum(model, examples, 0, head, _capture_head_input, torch.device("cpu"))
    loss.backward()
    return loss.item(), int(correct), count, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [_llama, lambda a: _llama(a, tied=False), _qwen2])
@pytest.mark.parametrize("shared", [0, 7])
@pytest.mark.parametrize("row_tokens", [1000, 12])  # one row, or several padded rows
def test_packed_equals_each_example_alone(build, attention, shared, row_tokens, monkeypatch):
    monkeypatch.setattr(packing, "ROW_TOKENS", row_tokens)
    monkeypatch.setattr(shared_prefix, "MIN_TOKENS_SAVED", 0)
    model = build(attention)
    examples = _examples(shared)
    assert packing.applies(model)
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)

    got = _packed(model, examples)
    want = _alone(model, examples)

    own = sum(len(e.input_ids) - shared for e in examples)
    assert calls[0] == ((1, shared) if shared else calls[0])
    packed_call = calls[1 if shared else 0]
    assert packed_call[0] == (1 if row_tokens > own else packed_call[0]) and packed_call[0] * packed_call[1] >= own
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got[1:3] == want[1:3]
    for name in want[3]:
        assert torch.allclose(got[3][name], want[3][name], rtol=1e-4, atol=1e-6), name


def test_rows_hold_every_example_once_within_capacity():
    lengths = [9, 3, 14, 1, 6, 6, 2, 11]
    rows = packing._rows(lengths, 14)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 14 for row in rows)
    assert len(rows) == 4  # 52 tokens need 4 rows of 14 at least


def test_no_shared_head_when_it_does_not_pay_or_cannot_be_cached():
    model = _llama("sdpa")
    assert packing._shared_length(model, _examples(7)) == 0  # 4 x 7 positions saved < MIN_TOKENS_SAVED
    examples = _examples(12)
    assert packing._shared_length(model, examples) == 12
    model.activation_checkpointing_enable()
    assert packing._shared_length(model, examples) == 0


def test_applies_only_where_known_to_hold():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from lorakit.prefix import PrefixConfig, add_prefix

    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    neox = GPTNeoXForCausalLM(config)
    assert not packing.applies(neox)  # not known to take restarted positions and a 4-D mask
    model = _llama("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    assert not packing.applies(model)
    model = _llama("sdpa")
    add_prefix(model, PrefixConfig(num_virtual_tokens=3), seed=0)
    assert not packing.applies(model)  # the prefix's hook fills the cache
