"""lorakit.loralib against Microsoft's loralib itself (same weights → same outputs and state dicts)."""

import loralib as reference
import pytest
import torch
from torch import nn

from lorakit import LorakitError
from lorakit import loralib as lora


def copy_params(src: nn.Module, dst: nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


def randomize(module: nn.Module) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))


LAYERS = [
    ("Linear", (10, 12), {"r": 4, "lora_alpha": 8}, lambda: torch.randn(3, 10)),
    ("Linear", (10, 12), {"r": 4, "fan_in_fan_out": True}, lambda: torch.randn(3, 10)),
    ("Embedding", (20, 6), {"r": 3, "lora_alpha": 2}, lambda: torch.randint(0, 20, (2, 5))),
    ("MergedLinear", (8, 12), {"r": 2, "enable_lora": [True, False, True]}, lambda: torch.randn(4, 8)),
    ("Conv2d", (3, 5, 3), {"r": 2, "padding": 1}, lambda: torch.randn(2, 3, 6, 6)),
]


@pytest.mark.parametrize("cls, args, kwargs, make_input", LAYERS)
def test_same_state_dict_keys_shapes_and_outputs_as_loralib(cls, args, kwargs, make_input):
    torch.manual_seed(0)
    theirs = getattr(reference, cls)(*args, **kwargs)
    ours = getattr(lora, cls)(*args, **kwargs)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    randomize(theirs)
    copy_params(theirs, ours)
    x = make_input()
    theirs.train()
    ours.train()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    theirs.eval()  # loralib merges here as a side effect; lorakit never does
    ours.eval()
    assert not ours.merged
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    ours.merge()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_lorakit_conv1d_and_conv3d_work_where_loralib_shapes_do_not():
    for cls, shape in ((lora.Conv1d, (2, 3, 9)), (lora.Conv3d, (2, 3, 4, 4, 4))):
        layer = cls(3, 4, 3, r=2)
        randomize(layer)
        x = torch.randn(shape)
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
        layer.unmerge()


def test_merged_linear_adapts_only_enabled_slices():
    layer = lora.MergedLinear(8, 12, r=2, enable_lora=[True, False, True])
    randomize(layer)
    delta = layer.delta_weight()
    assert torch.count_nonzero(delta[4:8]) == 0 and torch.count_nonzero(delta[:4]) > 0


def test_document_example_runs_with_only_the_import_changed(tmp_path):
    """The seed tutorial's loralib example (004_2127f78bd68896b1.txt), import line swapped."""
    from lorakit import loralib as lora  # was: import loralib as lora

    in_features, out_features = 16, 8

    class YourNeuralNetwork(nn.Module):
        def __init__(self):
            super().__init__()
            # Add a pair of low-rank adaptation matrices with rank r=16
            self.layer = lora.Linear(in_features, out_features, r=16)
            self.out = nn.Linear(out_features, 2)

        def forward(self, x):
            return self.out(torch.relu(self.layer(x)))

    model = YourNeuralNetwork()
    # This sets requires_grad to False for all parameters
    lora.mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"layer.lora_A", "layer.lora_B"}
    frozen = model.layer.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    dataloader = [(torch.randn(4, in_features), torch.randint(0, 2, (4,))) for _ in range(3)]
    for x, y in dataloader:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(model.layer.weight, frozen)
    checkpoint_path = tmp_path / "ckpt.pt"
    torch.save(lora.lora_state_dict(model), checkpoint_path)
    state = torch.load(checkpoint_path, weights_only=True)
    assert set(state) == {"layer.lora_A", "layer.lora_B"}
    # the checkpoint loads into Microsoft's loralib model of the same shape
    theirs = nn.Sequential()
    theirs.layer = reference.Linear(in_features, out_features, r=16)
    theirs.layer.load_state_dict(
        {**theirs.layer.state_dict(), "lora_A": state["layer.lora_A"], "lora_B": state["layer.lora_B"]}
    )


def test_bias_modes_match_loralib():
    def build(lib):
        torch.manual_seed(0)
        return nn.Sequential(lib.Linear(4, 4, r=2), nn.Linear(4, 4))

    for bias in ("none", "all", "lora_only"):
        ours, theirs = build(lora), build(reference)
        lora.mark_only_lora_as_trainable(ours, bias=bias)
        reference.mark_only_lora_as_trainable(theirs, bias=bias)
        assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in theirs.parameters()]
        assert set(lora.lora_state_dict(ours, bias=bias)) == set(reference.lora_state_dict(theirs, bias=bias))
    with pytest.raises(LorakitError, match="bias"):
        lora.mark_only_lora_as_trainable(build(lora), bias="most")
