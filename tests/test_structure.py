"""Default targets from a model's structure: any transformers model gets its attention q/v with no --targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.inject import DEFAULT_TARGETS
from lorakit.structure import default_targets


def tiny(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=96)
    sizes.update(pad_token_id=0, bos_token_id=0, eos_token_id=0)
    config = AutoConfig.for_model(model_type, **sizes, **extra)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("model_type", "extra", "expected"),
    [
        ("llama", {}, ["q_proj", "v_proj"]),  # the table
        ("cohere", {"num_key_value_heads": 2}, ["q_proj", "v_proj"]),  # not in the table: by name and shape
        ("phi3", {}, ["qkv_proj"]),
        ("deepseek_v3", {"q_lora_rank": 16, "kv_lora_rank": 16}, ["q_b_proj", "kv_b_proj"]),  # latent attention
        ("mamba", {}, "all-linear"),  # no attention at all
    ],
)
def test_default_targets_by_table_name_and_shape(model_type, extra, expected):
    assert default_targets(tiny(model_type, **extra), DEFAULT_TARGETS) == expected


class Config:
    model_type = "homemade"
    hidden_size = 16
    num_attention_heads = 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(16, 16), "c": nn.Linear(16, 16)})
        self.ff = nn.Linear(16, 16)

    def forward(self, x):
        a = self.attention
        return self.ff(a["a"](x) + a["b"](x) + a["c"](x))


class Homemade(nn.Module):
    """Unknown names: the query and value are found by shape, in definition order (q, k, v)."""

    def __init__(self):
        super().__init__()
        self.config = Config()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_unknown_names_found_by_shape_and_injected():
    model = Homemade()
    assert default_targets(model, DEFAULT_TARGETS) == ["a", "c"]
    lorakit.inject(model, LoraConfig(r=2))  # target_modules=None
    assert sorted(lorakit.count_parameters(model).rows[i][0] for i in range(4)) == [
        "blocks.0.attention.a",
        "blocks.0.attention.c",
        "blocks.1.attention.a",
        "blocks.1.attention.c",
    ]
