"""Trainer pieces: the optimizer's parameter groups (adapter at --lr, saved / new heads at --head-lr)."""

import pytest

from lorakit import LoraConfig, LorakitError, inject
from lorakit.train import TrainConfig
from lorakit.train.build import param_groups


def test_head_lr_puts_saved_heads_in_their_own_group():
    from tiny_models import tiny_bert

    model = tiny_bert()
    inject(model, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(model="m", data="d", out="o", task="seq-cls", lr=1e-3, head_lr=None)
    (group,) = param_groups(model, cfg)
    assert {id(p) for p in group["params"]} == set(trainable)
    adapter, head = param_groups(model, TrainConfig(model="m", data="d", out="o", lr=1e-3, head_lr=5e-3))
    assert "lr" not in adapter and head["lr"] == 5e-3
    assert all("lora" in trainable[id(p)] for p in adapter["params"])
    assert all("classifier" in trainable[id(p)] for p in head["params"])
    assert len(adapter["params"]) + len(head["params"]) == len(trainable)
    with pytest.raises(LorakitError, match=r"head_lr=0 is invalid \(--head-lr\)"):
        TrainConfig(model="m", data="d", out="o", head_lr=0)
