"""One decode step (one new token per row) with as little Python per token as the math allows.

A transformers forward spends much of a one-token step outside arithmetic: argument handling,
output records, mask building and cache bookkeeping, layer by layer. For the decoder layers
whose math is exactly

    a = x + o(attention(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))        (keys/values cached)
    y = a + mlp(n2(a))
    logits = head(norm(y))

(Llama, Mistral and Qwen2 with SDPA attention, no sliding window: `LEAN_LAYERS`) `decode_step` runs that
formula itself, calling the model's own submodules for every weight (embedding, norms,
projections with their LoRA / quantized wrappers and per-row adapters, MLP, rotary embedding,
head), and writes keys and values straight into the preallocated cache (kv_cache.StaticKV).
Each operation is the one transformers runs (same order, same kernels: scaled_dot_product_attention
with grouped-query heads, or packed per KV head under a padding mask), so the tokens are the
model's own. Other models, and models with prefixes or hooks on their layers, take the model's
forward with the same cache (`lean_layers` returns None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kv_cache import StaticKV

LEAN_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


def lean_layers(model: nn.Module) -> list[nn.Module] | None:
    """The decoder layers `decode_step` can run for `model`, or None (use the model's forward)."""
    from ..prefix import prefixes

    backbone = getattr(model, "model", None)
    layers = list(getattr(backbone, "layers", None) or [])
    if (
        not layers
        or any(type(layer).__name__ not in LEAN_LAYERS for layer in layers)
        or not all(hasattr(backbone, name) for name in ("embed_tokens", "rotary_emb", "norm"))
        or getattr(model, "lm_head", None) is None
        or getattr(model.config, "_attn_implementation", None) != "sdpa"
        or getattr(model.config, "sliding_window", None) is not None
        and type(layers[0]).__name__ == "MistralDecoderLayer"
        or any(getattr(layer.self_attn, "sliding_window", None) is not None for layer in layers)
        or prefixes(model) is not None
        or any(_hooked(m) for m in (model, backbone, *layers))
    ):
        return None
    return layers


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, cache: StaticKV, index: int, mask) -> Tensor:
    rows, dim = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(rows, 1, -1, dim).transpose(1, 2)
    k = attn.k_proj(x).view(rows, 1, -1, dim).transpose(1, 2)
    v = attn.v_proj(x).view(rows, 1, -1, dim).transpose(1, 2)
    q = (q * cos) + (_rotate_half(q) * sin)
    k = (k * cos) + (_rotate_half(k) * sin)
    keys, values = cache.write(index, k, v)
    groups = attn.num_key_value_groups
    if mask is None:
        out = F.scaled_dot_product_attention(q, keys, values, scale=attn.scaling, enable_gqa=groups > 1)
    else:  # one query per row: the heads of a KV group become that group's queries (no repeated keys)
        packed = q.reshape(rows, -1, groups, dim)
        out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=attn.scaling)
    return attn.o_proj(out.reshape(rows, 1, -1))  # (rows, heads, 1, dim) is already row-major as (rows, 1, heads·dim)


def decode_step(model: nn.Module, layers: list[nn.Module], ids: Tensor, positions: Tensor, cache: StaticKV, mask):
    """Logits (rows x vocab) for tokens `ids` (rows x 1) at `positions` (rows x 1); `mask` (rows x columns,
    bool, with the new column) or None when no row is padded. Writes the step's keys/values into `cache`."""
    backbone = model.model
    hidden = backbone.embed_tokens(ids)
    cos, sin = backbone.rotary_emb(hidden, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    mask = None if mask is None else mask[:, None, None, :]
    for index, layer in enumerate(layers):
        hidden = hidden + _attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin, cache, index, mask)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    cache.advance()
    return model.lm_head(backbone.norm(hidden))[:, -1]
