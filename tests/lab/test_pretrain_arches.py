"""pretrain-limits' model families: the MoE arm's parameter budget and block-local attention, checked directly."""

import math

import torch
from torch import nn

from lorakit_lab.pretrain_arches import active_parameters, block_local_attention, build, dense_width
from lorakit_lab.pretrain_methods import Method, Rates, Size, configure

SIZE = Size("t", 32, 2, 2)


class _Holder(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.config = type("C", (), {"block_local_width": width})()


def test_block_local_attention_equals_a_dense_masked_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 11, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped-query: 2 key/value heads for 4 query heads
    out, _ = block_local_attention(_Holder(4), q, k, v, None, scaling=0.35)
    i = torch.arange(11)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] // 4 - i[None, :] // 4 <= 1)  # own block + previous one
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2) * 0.35).masked_fill(~allowed, -math.inf)
    expected = (scores.softmax(-1) @ vv).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_local_model_is_the_dense_model_inside_one_block_and_forgets_beyond_two():
    dense, local = build(SIZE, 64, 0, "dense"), build(SIZE, 64, 0, "local", block=8)
    local.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(local(ids[:, :8]).logits, dense(ids[:, :8]).logits, atol=1e-5, rtol=1e-5)
        changed = ids.clone()
        changed[0, 0] = (changed[0, 0] + 1) % 256
        moved = (local(changed).logits - local(ids).logits)[0].abs().amax(-1)
    # each layer reaches one block further back: with two layers token 0 (block 0) reaches block 2, not 3
    assert moved[16:24].max() > 0 and moved[24:].max() == 0


def test_moe_runs_the_dense_models_weights_per_token_and_holds_twice_its_mlp():
    dense, moe = build(SIZE, 64, 0, "dense"), build(SIZE, 64, 0, "moe")
    mlp = 3 * SIZE.hidden * dense_width(SIZE.hidden) * SIZE.layers
    router = 4 * SIZE.hidden * SIZE.layers
    dense_total = sum(p.numel() for p in dense.parameters())
    assert active_parameters(dense) == dense_total
    assert active_parameters(moe) == dense_total + router
    assert sum(p.numel() for p in moe.parameters()) == dense_total + mlp + router


def test_moe_lora_adapts_every_expert_and_freezes_the_stacks():
    model = build(SIZE, 64, 0, "moe")
    configure(model, Method("moe-lora-r2", "lora", 2, arch="moe"), Rates(1e-3, 1e-3, 1e-2), 0)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    width = dense_width(SIZE.hidden) // 2
    per_layer_experts = 4 * 2 * (SIZE.hidden + 2 * width) + 4 * 2 * (width + SIZE.hidden)  # E·r·(k + d), two stacks
    expert_factors = sum(v for n, v in trainable.items() if ".experts." in n)
    assert expert_factors == SIZE.layers * per_layer_experts
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in trainable)  # the stacks stay frozen
