"""The fused, chunked head + cross-entropy against the plain computation over full logits (fp32):
the same loss, the same argmax hits and the same gradients, for several chunk sizes, for an untied
head with a bias and for tied input/output embeddings (as SmolLM2 has)."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.train import head_loss
from lorakit.train.data import IGNORE, Example, collate
from lorakit.train.head_loss import linear_cross_entropy
from lorakit.train.objective import loss_sum


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_plain_cross_entropy(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (7,), generator=g)

    loss, correct = linear_cross_entropy(hidden, weight, bias, targets, chunk=chunk)
    (loss * 0.37).backward()
    fused = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None

    logits = F.linear(hidden, weight, bias).float()
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (reference * 0.37).backward()
    plain = [t.grad for t in (hidden, weight, bias) if t is not None]

    assert torch.allclose(loss, reference, rtol=1e-6, atol=1e-5)
    assert correct.item() == (logits.argmax(-1) == targets).sum().item()
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_and_frozen_weight():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(20, 8, generator=g)
    targets = torch.randint(0, 20, (5,), generator=g)
    reference = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    with torch.no_grad():
        loss, _ = linear_cross_entropy(hidden, weight, None, targets, chunk=2)
    assert torch.allclose(loss, reference, rtol=1e-6)
    hidden.requires_grad_(True)
    loss, _ = linear_cross_entropy(hidden, weight, None, targets, chunk=2)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None


def _batch(vocab: int):
    g = torch.Generator().manual_seed(2)
    examples = []
    for length, prompt in ((9, 6), (5, 2), (12, 1), (7, 7)):  # the last has a single target (its final token)
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        examples.append(Example(ids, labels=[IGNORE] * prompt + ids[prompt:]))
    examples[-1].labels[-1] = examples[-1].input_ids[-1]
    return collate(examples, pad_id=0)


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
@pytest.mark.parametrize("build", [lambda: _llama(tied=True), lambda: _llama(tied=False), _gpt2])
def test_loss_sum_matches_full_logits(build, chunk_rows, monkeypatch):
    """Every parameter trains (the tied embedding gets gradient from both its uses); dropout off."""
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 96 * chunk_rows)
    model = build().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = _batch(96)

    total, correct, count = loss_sum(model, batch, "causal-lm")
    total.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[-1] == 96  # the head runs normally outside loss_sum
    flat_logits = logits[:, :-1].reshape(-1, 96).float()
    flat_targets = batch["labels"][:, 1:].reshape(-1)
    reference = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="sum")
    reference.backward()
    keep = flat_targets != IGNORE

    assert count == int(keep.sum()) == 3 + 3 + 11 + 1
    assert torch.allclose(total, reference, rtol=1e-6)
    assert correct.item() == (flat_logits[keep].argmax(-1) == flat_targets[keep]).sum().item()
    for name, p in model.named_parameters():
        assert torch.allclose(fused[name], p.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("build", [lambda: _llama(tied=True), _gpt2])
def test_shared_prefix_is_the_same_function(build, monkeypatch):
    """Rows sharing their first 9 tokens: the prefix computed once gives the full pass's loss and gradients."""
    from lorakit.train import shared_prefix as prefix

    model = build().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    g = torch.Generator().manual_seed(3)
    head = torch.randint(0, 96, (9,), generator=g).tolist()
    examples = []
    for extra, prompt in ((6, 11), (1, 3), (12, 9), (4, 8)):  # targets start inside and right after the prefix
        ids = head + torch.randint(0, 96, (extra,), generator=g).tolist()
        examples.append(Example(ids, labels=[IGNORE] * prompt + ids[prompt:]))
    batch = collate(examples, pad_id=0)
    assert prefix.shared_length(model, batch["input_ids"], batch["attention_mask"]) == 0  # too short to pay here

    def run(min_saved):
        monkeypatch.setattr(prefix, "MIN_TOKENS_SAVED", min_saved)
        model.zero_grad(set_to_none=True)
        total, correct, count = loss_sum(model, batch, "causal-lm")
        total.backward()
        return total.detach(), correct, count, {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    shared = run(0)
    assert calls == [(1, 9), (4, 12)]  # the prefix once, then the suffixes
    plain = run(10**9)
    assert calls[2:] == [(4, 21)]
    assert torch.allclose(shared[0], plain[0], rtol=1e-6) and shared[1:3] == plain[1:3]
    for name in plain[3]:
        assert torch.allclose(shared[3][name], plain[3][name], rtol=1e-4, atol=1e-6), name
