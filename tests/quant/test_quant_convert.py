"""quantize_base / dequantize_base on whole models: what gets which storage, ties, heads, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.errors import LorakitError
from lorakit.layers import LoraWrapper
from lorakit.quant import (
    ComputePlan,
    QuantEmbedding,
    QuantLinear,
    base_format,
    dequantize_base,
    merge_precision,
    quantize_base,
    set_plan,
    storage_bytes,
)


@pytest.fixture(autouse=True)
def dequantized_arithmetic():
    old = set_plan(ComputePlan("test", {}))
    yield
    set_plan(old)


def test_int4_keeps_tied_embedding_and_head_at_int8_in_one_storage():
    model = tiny_llama(vocab=128)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    before = storage_bytes(model)
    counts = quantize_base(model, "int4")
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, QuantEmbedding) and isinstance(head, QuantLinear)
    assert embed.storage is head.storage and embed.storage.kind == "int8"
    assert counts == {"int4": 14, "int8": 2}  # 7 Linear layers x 2 blocks; the table counted once per user
    assert model.model.norm.weight.dtype == torch.float32
    assert storage_bytes(model) < 0.3 * before
    dequantize_base(model)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_gpt2_conv1d_becomes_a_linear_and_comes_back_as_conv1d():
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    lorakit.inject(model, LoraConfig(r=2, target_modules=["c_attn"]), base_dtype="int8")
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, QuantLinear) and not layer.fan_in_fan_out
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)  # int8 error only
    lorakit.merge_and_unload(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_a_classifier_head_trained_on_a_quantized_base_is_an_fp32_copy():
    model = tiny_bert()
    quantize_base(model, "int4")
    lorakit.inject(model, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    copy_ = model.classifier.copies["default"]
    assert type(copy_) is torch.nn.Linear and copy_.weight.requires_grad
    ids = torch.randint(0, 128, (2, 6))
    model(ids).logits.sum().backward()
    assert copy_.weight.grad is not None


def test_a_bad_base_dtype_changes_nothing():
    model = tiny_llama()
    with pytest.raises(
        LorakitError, match="base_dtype='nf4' is not supported; use one of fp32, bf16, fp16, int8, int4"
    ):
        lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]), base_dtype="nf4")
    assert not any(isinstance(m, (LoraWrapper, QuantLinear)) for m in model.modules())
    assert base_format(torch.bfloat16) == "bf16" and base_format("INT4") == "int4"


def test_merge_precision_compares_the_update_with_requantization_error():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), base_dtype="int4", seed=0)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, LoraWrapper)):
            layer.lora_B["default"].fill_(1e-3)
    rows = merge_precision(model)
    assert [r[0] for r in rows] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    for _, kind, change, error in rows:
        assert kind == "int4" and 0 < change < 0.05 and 0.01 < error < 0.2
