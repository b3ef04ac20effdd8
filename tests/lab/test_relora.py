"""merge_and_restart keeps the model's function and lets the total update outgrow rank r."""

import torch
from torch import nn

from lorakit import LoraConfig, inject
from lorakit.model_state import lora_layers
from lorakit_lab.relora import jagged_factor, merge_and_restart


def test_merge_and_restart_is_exact_and_accumulates_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    w_init = model[0].weight.detach().clone()
    inject(model, LoraConfig(r=2, alpha=2, target_modules=["0", "2"]), seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 16)
    for cycle in range(3):
        for _ in range(3):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        before = model(x)
        layer = dict(lora_layers(model))["0"]
        effective = layer.base_layer.weight.detach() + layer.delta_weight("default").detach()
        assert merge_and_restart(model, "default", opt, torch.Generator().manual_seed(cycle)) == 2
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)  # B = 0 again: same function
        torch.testing.assert_close(layer.base_layer.weight.detach(), effective)
        assert torch.count_nonzero(layer.lora_B["default"]) == 0
        assert layer.lora_A["default"] not in opt.state
    # three rank-2 cycles: the merged update has rank up to 6 > r
    assert torch.linalg.matrix_rank(model[0].base_layer.weight.detach() - w_init) > 2


def test_jagged_factor_rewarms_after_each_restart():
    assert jagged_factor(5, 10, 4) == 1.0
    assert jagged_factor(10, 10, 4) == 0.25
    assert jagged_factor(13, 10, 4) == 1.0
