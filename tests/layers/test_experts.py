"""LoRA on 3-D expert parameters (layers/experts.py) on tiny transformers MoE models.

The reference is independent of lorakit: each expert's weight W[e] + s·B_e·A_e is computed by hand
from PEFT's documented layout (A row e·r + j, B column j·E + e) and written into a plain copy of
the model, whose output the adapted model must match.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.model_state import adapter_configs, lora_layers

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny_moe import EXPERT_PARAMETERS, KINDS, ToyMoE, tiny_moe  # noqa: E402

IDS = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))


def randomize(model, name, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.specs:
                for store in (layer.lora_A, layer.lora_B):
                    store[name].copy_(scale * torch.randn(store[name].shape, generator=g))


def adapted(kind, name="a", r=2, alpha=4.0, seed=1, **kwargs):
    model = tiny_moe(kind)
    config = LoraConfig(r=r, alpha=alpha, target_modules=[], target_parameters=EXPERT_PARAMETERS, **kwargs)
    lorakit.inject(model, config, name=name)
    randomize(model, name, seed)
    return model


def reference_model(kind, model, name):
    """A plain copy of the base with W[e] + s·B_e·A_e written in by hand, expert by expert."""
    plain = tiny_moe(kind)
    weights = dict(plain.named_parameters())
    for path, layer in lora_layers(model):
        spec, n = layer.specs[name], layer.num_experts
        a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
        key = layer.target_key(path)
        with torch.no_grad():
            for e in range(n):
                a_e = a[e * spec.r : (e + 1) * spec.r]  # expert-major rows
                b_e = b[:, e::n]  # column j·E + e
                delta = spec.scale * b_e @ a_e
                weights[key][e] += delta.T if layer.transposed else delta
    return plain


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_hand_built_expert_weights(kind):
    model = adapted(kind)
    assert {layer.parameter_name for _, layer in lora_layers(model)} == {"gate_up_proj", "down_proj"}
    expected = logits(reference_model(kind, model, "a"))
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    assert (logits(model) - logits(tiny_moe(kind))).abs().max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_merge_unmerge_and_delete(kind):
    model = adapted(kind)
    before = {n: p.detach().clone() for n, p in tiny_moe(kind).named_parameters()}
    live = logits(model)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model), live, atol=1e-6, rtol=1e-6)
    merged = model.model.layers[0].mlp.experts.base_layer.base_layer.gate_up_proj
    assert (merged - before["model.layers.0.mlp.experts.gate_up_proj"]).abs().max() > 1e-3
    lorakit.unmerge(model)
    torch.testing.assert_close(logits(model), live, atol=1e-6, rtol=1e-6)
    lorakit.delete_adapter(model, "a")
    assert type(model.model.layers[0].mlp.experts).__name__.endswith("Experts")
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for n, p in before.items():
        torch.testing.assert_close(after[n], p, atol=1e-6, rtol=0)


def test_delete_without_merge_restores_bitwise_and_merge_and_unload_is_plain():
    model = adapted("qwen2_moe")
    original = {n: p.detach().clone() for n, p in tiny_moe("qwen2_moe").named_parameters()}
    lorakit.delete_adapter(model, "a")
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    model = adapted("qwen2_moe")
    expected = logits(model)
    plain = lorakit.merge_and_unload(model)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain), expected, atol=1e-6, rtol=1e-6)


def test_mixed_batch_rows_equal_each_adapter_alone():
    model = adapted("mixtral", name="a", seed=1)
    lorakit.inject(
        model, LoraConfig(r=4, alpha=2.0, target_modules=["q_proj"], target_parameters=EXPERT_PARAMETERS), name="b"
    )
    randomize(model, "b", seed=2)
    names = ["a", None, "b"]
    with lorakit.per_row(model, names):
        mixed = logits(model)
    for row, name in enumerate(names):
        lorakit.set_adapter(model, name)
        torch.testing.assert_close(mixed[row : row + 1], logits(model, IDS[row : row + 1]), atol=1e-5, rtol=1e-5)


def test_training_reaches_the_factors_only():
    model = adapted("olmoe")
    lorakit.set_trainable(model, "a")
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    layers = [layer for _, layer in lora_layers(model)]
    assert all(layer.lora_A["a"].grad is not None and layer.lora_A["a"].grad.abs().sum() > 0 for layer in layers)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_rank_and_alpha_patterns_use_the_parameter_name():
    config = LoraConfig(
        r=2, target_modules=[], target_parameters=["gate_up_proj", "down_proj"], rank_pattern={"down_proj": 3}
    )
    model = lorakit.inject(tiny_moe("mixtral"), config)
    ranks = {layer.parameter_name: layer.specs["default"].r for _, layer in lora_layers(model)}
    assert ranks == {"gate_up_proj": 2, "down_proj": 3}
    layer = model.model.layers[0].mlp.experts
    assert tuple(layer.lora_A["default"].shape) == (4 * 3, 24) and tuple(layer.lora_B["default"].shape) == (16, 3 * 4)


def test_per_expert_linear_modules_are_plain_targets():
    model = ToyMoE()
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(3))
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.inject(model, LoraConfig(r=2, target_modules=r"experts\.\d+\.(up|down)"), name=name)
        randomize(model, name, seed)
    assert len(list(lora_layers(model))) == 6
    names = ["a", "b", None, "a"]
    with torch.no_grad(), lorakit.per_row(model, names):
        mixed = model(x)
    for row, name in enumerate(names):
        lorakit.set_adapter(model, name)
        with torch.no_grad():
            torch.testing.assert_close(mixed[row], model(x[row : row + 1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dropout": 0.1}, "dropout is not supported on target_parameters"),
        ({"use_dora": True}, "use_dora is not supported"),
        ({"init": "pissa"}, "init='pissa' is not supported on target_parameters"),
        ({"r": 100}, "exceeds the expert's larger dimension"),
    ],
)
def test_refusals_leave_the_model_untouched(kwargs, message):
    model = tiny_moe("mixtral")
    before = copy.deepcopy(model.state_dict())
    config = LoraConfig(**{"r": 2, "target_modules": [], "target_parameters": EXPERT_PARAMETERS, **kwargs})
    with pytest.raises(LorakitError, match=message):
        lorakit.inject(model, config)
    assert set(model.state_dict()) == set(before) and all(
        torch.equal(v, before[k]) for k, v in model.state_dict().items()
    )


def test_adapters_must_target_the_same_parameters():
    model = adapted("mixtral")
    with pytest.raises(LorakitError, match="must target the same parameters"):
        lorakit.inject(model, LoraConfig(r=2, target_modules=[], target_parameters=["experts.down_proj"]), name="b")
    assert list(adapter_configs(model)) == ["a"]
    assert all(set(layer.specs) == {"a"} for _, layer in lora_layers(model))


def test_unknown_parameter_names_the_candidates():
    with pytest.raises(LorakitError, match=r"matched no parameter; .*experts\.gate_up_proj"):
        lorakit.inject(tiny_moe("qwen3_moe"), LoraConfig(target_modules=[], target_parameters=["experts.w1"]))
    with pytest.raises(LorakitError, match="target_parameters"):
        lorakit.inject(tiny_moe("qwen3_moe"), LoraConfig(target_modules=["experts"]))


@pytest.mark.parametrize(
    "value",
    ["experts.gate_up_proj", [], ["experts.*"], [3], ["experts..down"]],
    ids=["str", "empty", "regex", "int", "dots"],
)
def test_config_validates_target_parameters(value):
    with pytest.raises(
        LorakitError, match=r"LoraConfig.target_parameters=.* is invalid: give a list of parameter names"
    ):
        LoraConfig(target_parameters=value)


def test_empty_target_modules_needs_target_parameters():
    with pytest.raises(LorakitError, match="LoraConfig.target_modules"):
        LoraConfig(target_modules=[])


def test_combine_refuses_expert_adapters():
    model = adapted("mixtral")
    with pytest.raises(LorakitError, match="combine does not sum yet"):
        lorakit.combine(model, {"a": 1.0}, name="mix")
    assert list(adapter_configs(model)) == ["a"]
