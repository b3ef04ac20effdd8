"""One decode step (one new token per row) with as little Python per token as the math allows.

A transformers forward spends much of a one-token step outside arithmetic: argument handling,
output records, mask building and cache bookkeeping, layer by layer. For the decoder layers
whose math is exactly

    a = x + o(attention(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))        (keys/values cached)
    y = a + down(act(gate(n2(a))) · up(n2(a)))
    logits = head(norm(y))

(Llama, Mistral and Qwen2 with SDPA attention, no sliding window: `LEAN_LAYERS`) `decode_step` runs that
formula itself on (rows x hidden) activations, calling the model's own weights for every product
(embedding, norms, projections with their LoRA / quantized wrappers and per-row adapters, MLP,
rotary embedding, head), and writes keys and values straight into the preallocated cache
(kv_cache.StaticKV). Each operation is the one transformers runs (same order, same kernels:
scaled_dot_product_attention with grouped-query heads, or packed per KV head under a padding mask),
so the tokens are the model's own. Other models, and models with prefixes or hooks on their
layers, take the model's forward with the same cache (`lean_layers` returns None).

Two ways to reach the weights, one step body (`Step`: per layer, the callables it runs):
  - `module_steps`: the modules themselves, called as usual (a mixed batch routed by lorakit.per_row);
  - `shared_steps`: when every row uses the same adapter (or none: one stream, `lorakit generate`),
    each projection becomes its base product plus that adapter's term, out + s·(x·Aᵀ)·Bᵀ, computed by
    the layer's own `_add_low_rank` with nothing routed per row and no module call machinery (the
    numbers of the layer's own forward with that adapter active). Built per step (a few µs per
    layer, so adapters may come and go between steps); None when some module needs its own forward
    (DoRA, other wrapper kinds, a merged adapter, hooks, a modules_to_save copy): use `module_steps`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Linear, LoraWrapper, SavedModule
from .kv_cache import StaticKV

LEAN_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}
PLAIN_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}  # down(act(gate(x)) * up(x))
PLAIN_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}  # no state beyond weight and eps

Fn = Callable[[Tensor], Tensor]


class Step(NamedTuple):
    """What one decoder layer runs: norms, projections and MLP as callables on (rows x features)."""

    attn: nn.Module  # for head_dim, num_key_value_groups, scaling
    norm1: Fn
    q: Fn
    k: Fn
    v: Fn
    o: Fn
    norm2: Fn
    mlp: Fn


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


def module_steps(layers: list[nn.Module]) -> list[Step]:
    """Every layer's own modules (hooks, per-row routing and all)."""
    steps = []
    for layer in layers:
        attn = layer.self_attn
        steps.append(
            Step(
                attn, layer.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                layer.post_attention_layernorm, layer.mlp,
            )
        )  # fmt: skip
    return steps


def shared_steps(model: nn.Module, layers: list[nn.Module], name: str | None) -> list[Step] | None:
    """Steps for a batch whose rows all use adapter `name` (None: the base), or None (see module docstring)."""
    backbone = model.model
    if any(isinstance(m, (LoraWrapper, SavedModule)) for m in (backbone.embed_tokens, backbone.norm, model.lm_head)):
        return None
    steps = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        norms = [_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)]
        projections = [
            _projection(m, name)
            for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        ]
        if None in norms or None in projections or type(mlp).__name__ not in PLAIN_MLPS or _hooked(mlp):
            return None
        act = mlp.act_fn if not isinstance(mlp.act_fn, nn.Module) or _hooked(mlp.act_fn) else mlp.act_fn.forward
        q, k, v, o, gate, up, down = projections
        steps.append(Step(attn, norms[0], q, k, v, o, norms[1], partial(_mlp, gate, up, down, act)))
    return steps


def _mlp(gate: Fn, up: Fn, down: Fn, act: Fn, x: Tensor) -> Tensor:
    return down(act(gate(x)) * up(x))  # LlamaMLP.forward's order


def _norm(module: nn.Module) -> Fn | None:
    return module.forward if type(module).__name__ in PLAIN_NORMS and not _hooked(module) else None


def _projection(module: nn.Module, name: str | None) -> Fn | None:
    """x -> module(x) with adapter `name` active, without the module call, or None if that needs the module."""
    if _hooked(module):
        return None
    if not isinstance(module, LoraWrapper):
        return _base(module)
    if type(module) is not Linear or module.merged is not None or module.fan_in_fan_out:
        return None
    base = _base(module.base_layer)
    if base is None or name not in module.specs:
        return base
    spec = module.specs[name]
    if spec.use_dora or spec.dropout and module.training:
        return None
    return partial(_with_adapter, base, module._add_low_rank, name)


def _with_adapter(base: Fn, add_low_rank: Callable, name: str, x: Tensor) -> Tensor:
    return add_low_rank(base(x), x, name)  # the wrapper's own forward: out + s·B·A·x, one addmm


def _base(module: nn.Module) -> Fn | None:
    if _hooked(module) or isinstance(module, (LoraWrapper, SavedModule)):
        return None
    if type(module) is nn.Linear:
        return partial(F.linear, weight=module.weight, bias=module.bias)
    if getattr(module, "lorakit_quantized", False):  # QuantLinear: its own forward (kernel or dequantized)
        return module.forward
    return None


def _rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """transformers' x·cos + rotate_half(x)·sin, with rotate_half(x) = (-x2, x1) written as roll(x)·(-1, 1):
    negating a factor is exact, so the product is bitwise the same, in one op instead of four."""
    return (x * cos) + (torch.roll(x, x.shape[-1] // 2, -1) * signed_sin)


def _attention(step: Step, x: Tensor, cos: Tensor, signed_sin: Tensor, cache: StaticKV, index: int, mask) -> Tensor:
    attn, rows = step.attn, x.shape[0]
    dim = attn.head_dim
    q = step.q(x).view(rows, -1, 1, dim)  # (rows, heads, 1, dim): one query per row
    k = step.k(x).view(rows, -1, 1, dim)
    v = step.v(x).view(rows, -1, 1, dim)
    q, k = _rope(q, cos, signed_sin), _rope(k, cos, signed_sin)
    keys, values = cache.write(index, k, v)
    groups = attn.num_key_value_groups
    if mask is None:
        out = F.scaled_dot_product_attention(q, keys, values, scale=attn.scaling, enable_gqa=groups > 1)
    else:  # one query per row: the heads of a KV group become that group's queries (no repeated keys)
        packed = q.reshape(rows, -1, groups, dim)
        out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=attn.scaling)
    return step.o(out.reshape(rows, -1))  # (rows, heads, 1, dim) is already row-major as (rows, heads·dim)


def decode_step(model: nn.Module, steps: list[Step], ids: Tensor, positions: Tensor, cache: StaticKV, mask):
    """Logits (rows x vocab) for tokens `ids` (rows x 1) at `positions` (rows x 1); `mask` (rows x columns,
    bool, with the new column) or None when no row is padded. Writes the step's keys/values into `cache`."""
    backbone = model.model
    embedded = backbone.embed_tokens(ids)
    hidden = embedded.reshape(ids.shape[0], -1)
    cos, sin = backbone.rotary_emb(embedded, positions)
    half = sin.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), -1).unsqueeze(1)  # (rows, 1, 1, dim)
    mask = None if mask is None else mask[:, None, None, :]
    for index, step in enumerate(steps):
        hidden = hidden + _attention(step, step.norm1(hidden), cos, sin, cache, index, mask)
        hidden = hidden + step.mlp(step.norm2(hidden))
    cache.advance()
    return model.lm_head(backbone.norm(hidden))
