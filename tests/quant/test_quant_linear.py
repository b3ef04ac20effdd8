"""QuantLinear and LoRA on a quantized frozen base, against the same model with the base dequantized to fp32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.quant import ComputePlan, Int4Weight, QuantLinear, dequantize_base, quantize_base, set_plan


@pytest.fixture
def dequantized_arithmetic():
    """Every size dequantizes + fp32 GEMMs: the quantized model computes what its fp32 twin does."""
    old = set_plan(ComputePlan("test", {}))
    yield
    set_plan(old)


@pytest.fixture
def kernels_everywhere():
    old = set_plan(ComputePlan("test", {"int4": 10**6, "int8": 10**6, "bf16": 10**6}))
    yield
    set_plan(old)


def twins(fmt: str, **config):
    """(model with a `fmt` base and a trained-looking adapter, the same model with the base in fp32)."""
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **config), seed=0, base_dtype=fmt)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    reference = copy.deepcopy(model)
    dequantize_base(reference)
    return model, reference


def test_frozen_matmul_gradient_reaches_the_input_only(dequantized_arithmetic):
    storage = Int4Weight.quantize(torch.randn(48, 64, generator=torch.Generator().manual_seed(0)))
    bias = torch.nn.Parameter(torch.randn(48))
    layer = QuantLinear(storage, bias=bias)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    reference_x = x.detach().clone().requires_grad_(True)
    weight = storage.dequantize()
    expected = F.linear(reference_x, weight, bias.detach())
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, reference_x.grad)
    assert bias.grad is not None and not any(b.requires_grad for b in storage.buffers())


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
def test_training_on_a_quantized_base_matches_its_dequantized_twin(fmt, dequantized_arithmetic):
    model, reference = twins(fmt)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for m in (model, reference):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys() and len(grads) == 8
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_decoding_kernels_agree_with_the_dequantized_model(kernels_everywhere):
    model, reference = twins("int4")
    ids = torch.randint(0, 128, (3, 1))
    with torch.no_grad():
        got, expected = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, expected, atol=0.02 * expected.abs().max().item(), rtol=0)  # bf16 activations


def test_mixed_batch_rows_on_a_quantized_base(dequantized_arithmetic):
    model, _ = twins("int4")
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]), name="other", seed=1)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    separately = []
    for i, name in enumerate(["default", None, "other"]):
        lorakit.set_adapter(model, name)
        with torch.no_grad():
            separately.append(model(ids[i : i + 1]).logits)
    with torch.no_grad(), lorakit.per_row(model, ["default", None, "other"]):
        together = model(ids).logits
    torch.testing.assert_close(together, torch.cat(separately), rtol=1e-5, atol=1e-5)


def test_merging_into_a_quantized_base_keeps_fp32_and_unmerges_exactly(dequantized_arithmetic):
    model, reference = twins("int4")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        adapted = model(ids).logits
        base_before = model.model.layers[0].self_attn.q_proj.base_layer.storage.dequantize()
        lorakit.merge(model)
        merged_layer = model.model.layers[0].self_attn.q_proj.base_layer
        assert type(merged_layer) is torch.nn.Linear  # merged into an exact fp32 copy, not back into 4 bits
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        lorakit.unmerge(model)
        torch.testing.assert_close(merged_layer.weight, base_before, rtol=0, atol=1e-6)
        lorakit.merge_and_unload(model)
    assert not any(getattr(m, "lorakit_quantized", False) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_dora_and_pissa_on_a_quantized_base(dequantized_arithmetic):
    model, reference = twins("int4", use_dora=True)
    ids = torch.randint(0, 128, (2, 8))
    for m in (model, reference):
        m(input_ids=ids, labels=ids).loss.backward()
    a = model.model.layers[1].self_attn.v_proj.lora_magnitude["default"].grad
    b = reference.model.layers[1].self_attn.v_proj.lora_magnitude["default"].grad
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    residual = tiny_llama()  # inject(base_dtype=...) takes PiSSA's factors from fp32 W, then quantizes the residual
    lorakit.inject(residual, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"), base_dtype="int4")
    assert isinstance(residual.model.layers[0].self_attn.q_proj.base_layer, QuantLinear)
    loaded = tiny_llama()  # a base that is already quantized: PiSSA rewrites W, so that layer becomes fp32
    quantize_base(loaded, "int4")
    lorakit.inject(loaded, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"))
    assert type(loaded.model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_large_layers_dequantize_a_chunk_of_rows_at_a_time(kind, dequantized_arithmetic, monkeypatch):
    from lorakit.quant import linear, storage_for

    storage = storage_for(torch.randn(176, 64, generator=torch.Generator().manual_seed(0)), kind)
    weight = storage.dequantize()
    monkeypatch.setattr(linear, "CHUNK", 64 * 64)  # 64 rows per chunk: 3 chunks, the last one a tail
    assert len(linear._row_chunks(storage)) == 3
    x = torch.randn(5, 64, requires_grad=True)
    y = QuantLinear(storage)(x)
    reference = x.detach().clone().requires_grad_(True)
    expected = reference @ weight.t()
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
