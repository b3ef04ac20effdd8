"""Tiny seeded mixture-of-experts models built from transformers configs (no downloads).

Mixtral, Qwen2-MoE (with a shared expert), Qwen3-MoE and OLMoE keep each layer's experts in 3-D
parameters (E, out, in); GPT-OSS stores them transposed (E, in, out) and with biases. `ToyMoE` has
one nn.Linear per expert, the older layout (transformers' own MoE models no longer use it).
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def tiny_moe(kind: str, seed: int = 0, vocab: int = 64, eos: int | None = None) -> nn.Module:
    import transformers as hf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=eos if eos is not None else 0,
        bos_token_id=None,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    experts = dict(num_experts_per_tok=2)
    if kind == "mixtral":
        model = hf.MixtralForCausalLM(hf.MixtralConfig(intermediate_size=24, num_local_experts=4, **experts, **common))
    elif kind == "qwen2_moe":
        config = hf.Qwen2MoeConfig(
            intermediate_size=24, moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=4,
            **experts, **common,
        )  # fmt: skip
        model = hf.Qwen2MoeForCausalLM(config)
    elif kind == "qwen3_moe":
        config = hf.Qwen3MoeConfig(
            intermediate_size=24, moe_intermediate_size=12, num_experts=4, head_dim=8, **experts, **common
        )
        model = hf.Qwen3MoeForCausalLM(config)
    elif kind == "olmoe":
        model = hf.OlmoeForCausalLM(hf.OlmoeConfig(intermediate_size=12, num_experts=4, **experts, **common))
    elif kind == "gpt_oss":
        config = hf.GptOssConfig(
            intermediate_size=12, num_local_experts=4, head_dim=8, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], **experts, **common,
        )  # fmt: skip
        model = hf.GptOssForCausalLM(config)
        with torch.no_grad():  # GPT-OSS initialises its expert biases to zero: make them matter
            for name, param in model.named_parameters():
                if name.endswith("_bias"):
                    param.normal_(0, 0.1)
    else:
        raise ValueError(kind)
    return model.eval()


class ToyMoE(nn.Module):
    """Top-1 routing over per-expert nn.Linear pairs: experts.<e>.up / experts.<e>.down."""

    def __init__(self, d: int = 8, hidden: int = 12, experts: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(d, hidden), "down": nn.Linear(hidden, d)}) for _ in range(experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, d)
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            y = expert["down"](torch.relu(expert["up"](x)))
            out = out + y * (choice == e).unsqueeze(-1)
        return out
