"""combine(): the weighted sum of adapters, checked against Σ wᵢ·sᵢ·Bᵢ·Aᵢ computed explicitly."""

import pytest
import torch
from tiny_models import randomize_adapter, tiny_llama, token_ids

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.model_state import lora_layers


def setup_model():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="sql")
    lorakit.inject(model, LoraConfig(r=2, alpha=16, target_modules=["q_proj", "o_proj"], use_rslora=True), name="poet")
    randomize_adapter(model, "sql", 1)
    randomize_adapter(model, "poet", 2)
    return model


def explicit_sum(layer, weights):
    total = 0
    for name, w in weights.items():
        if name in layer.specs:
            a = layer.lora_A[name].detach().double()
            b = layer.lora_B[name].detach().double()
            total = total + w * layer.specs[name].scale * b @ a
    return total


def test_exact_combination_equals_weighted_sum_of_deltas():
    model = setup_model()
    weights = {"sql": 0.7, "poet": 0.3}
    expected = {p: explicit_sum(layer, weights) for p, layer in lora_layers(model)}
    report = lorakit.combine(model, weights, name="mix")
    assert report.max_relative_error == 0.0
    assert report.ranks["model.layers.0.self_attn.q_proj"] == 6
    assert report.ranks["model.layers.0.self_attn.v_proj"] == 4
    for path, layer in lora_layers(model):
        got = (layer.specs["mix"].scale * layer.lora_B["mix"] @ layer.lora_A["mix"]).double()
        torch.testing.assert_close(got, expected[path], atol=1e-6, rtol=1e-6)
    # and the model's output with the mix equals the base plus the explicit deltas
    ids = token_ids()
    mixed = model(ids).logits
    with torch.no_grad():
        for path, layer in lora_layers(model):
            layer.base_layer.weight += expected[path].float()
    with lorakit.disabled(model):
        torch.testing.assert_close(model(ids).logits, mixed, atol=1e-5, rtol=1e-5)


def test_truncated_combination_reports_the_svd_error():
    model = setup_model()
    weights = {"sql": 1.0, "poet": -0.5}
    expected = {p: explicit_sum(layer, weights) for p, layer in lora_layers(model)}
    report = lorakit.combine(model, weights, name="small", rank=3)
    path = "model.layers.0.self_attn.q_proj"
    layer = dict(lora_layers(model))[path]
    assert layer.specs["small"].r == 3
    s = torch.linalg.svdvals(expected[path])
    best_error = (s[3:].square().sum() / s.square().sum()).sqrt().item()
    assert report.relative_error[path] == pytest.approx(best_error, rel=1e-6)
    got = (layer.lora_B["small"] @ layer.lora_A["small"]).double()
    assert ((got - expected[path]).norm() / expected[path].norm()).item() == pytest.approx(best_error, rel=1e-5)
    assert (
        report.relative_error["model.layers.0.self_attn.v_proj"] < 1e-12
        or report.ranks["model.layers.0.self_attn.v_proj"] == 3
    )


def test_peft_style_averaging_of_a_and_b_is_not_the_sum():
    """Why we concatenate: averaging A and B separately (peft#1155) gives a different ΔW."""
    model = setup_model()
    layer = dict(lora_layers(model))["model.layers.0.self_attn.v_proj"]
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["v_proj"]), name="other")
    randomize_adapter(model, "other", 3)
    exact = explicit_sum(layer, {"sql": 0.5, "other": 0.5})
    a_avg = 0.5 * (layer.lora_A["sql"] + layer.lora_A["other"]).double()
    b_avg = 0.5 * (layer.lora_B["sql"] + layer.lora_B["other"]).double()
    averaged = layer.specs["sql"].scale * b_avg @ a_avg
    assert (averaged - exact).norm() / exact.norm() > 0.1


def test_combine_errors():
    model = setup_model()
    with pytest.raises(LorakitError, match="no adapter named"):
        lorakit.combine(model, {"nope": 1.0})
    with pytest.raises(LorakitError, match="rank"):
        lorakit.combine(model, {"sql": 1.0}, rank=0)
    lorakit.inject(model, LoraConfig(target_modules=["q_proj"], use_dora=True), name="d")
    with pytest.raises(LorakitError, match="DoRA"):
        lorakit.combine(model, {"sql": 1.0, "d": 1.0})
