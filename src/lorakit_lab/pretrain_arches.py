"""The model families pretrain-limits pre-trains: dense Llama, a mixture of experts, and block-local attention.

* dense  - Llama over bytes (vocabulary 256), MLP width I = 8/3·d (rounded down to a multiple of 8, so
           the experts' I/2 rows stay 16-byte aligned for grouped matmuls), untied head.
* moe    - Mixtral with the same attention, E = 4 experts of width I/2 and top-2 routing, so a token
           runs through 2 · 3·d·(I/2) = 3·d·I MLP weights, as in the dense model (plus the E x d router),
           while the model holds E/2 = 2x the MLP weights. The router's load-balancing loss is added
           to the training loss at Mixtral's coefficient; every reported loss is the language-model loss.
* local  - the dense model whose attention is block-local: the context is cut into blocks of w
           tokens and a query attends to the previous block and, causally, its own - between w and
           2w-1 keys instead of up to T. Cost per layer O(T·2w) instead of O(T²); the parameters are
           the dense model's exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHES = ("dense", "moe", "local")
EXPERTS, TOP_K = 4, 2
BLOCK_LOCAL = "lorakit_block_local"


def block_local_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: softmax(q·kᵀ·scaling + mask)·v over [previous block, own block].

    query (B, H, T, D), key / value (B, H_kv, T, D); returns (B, T, H, D) and no weights. The padding
    mask is ignored: pre-training windows are never padded.
    """
    width = module.config.block_local_width
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (key, value))
    b, h, t, d = query.shape
    pad = (-t) % width
    q, k, v = (F.pad(x, (0, 0, 0, pad)).view(b, h, -1, width, d) for x in (query, key, value))
    n = q.shape[2]
    k2, v2 = (torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :n], x], dim=3) for x in (k, v))  # (B,H,n,2w,D)
    i = torch.arange(width, device=query.device)
    own = i[None, :] <= i[:, None]  # causal inside the block
    previous = torch.ones(width, width, dtype=torch.bool, device=query.device)
    mask = torch.cat([previous, own], dim=1).expand(n, width, 2 * width).clone()
    mask[0, :, :width] = False  # the first block has no previous block
    out = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask, scale=scaling)
    out = out.reshape(b, h, n * width, d)[:, :, :t]
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(BLOCK_LOCAL, block_local_attention)


def _common(size, context: int) -> dict:
    return dict(
        vocab_size=256,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def dense_width(hidden: int) -> int:
    return int(hidden * 8 / 3) // 8 * 8


def build(size, context: int, seed: int, arch: str = "dense", block: int = 16) -> nn.Module:
    """A seeded random model of `arch` at `size` (pretrain_methods.Size)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    if arch == "moe":
        config = MixtralConfig(
            intermediate_size=dense_width(size.hidden) // 2,
            num_local_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            output_router_logits=True,
            sliding_window=None,
            **_common(size, context),
        )
        return MixtralForCausalLM(config)
    config = LlamaConfig(intermediate_size=dense_width(size.hidden), **_common(size, context))
    if arch == "local":
        _register()
        config.block_local_width = block
        config._attn_implementation = BLOCK_LOCAL
    elif arch != "dense":
        raise ValueError(f"arch {arch!r}: choose one of {', '.join(ARCHES)}")
    return LlamaForCausalLM(config)


def language_loss(output, model: nn.Module) -> torch.Tensor:
    """The next-byte cross-entropy without the router's load-balancing term (MoE adds it to .loss)."""
    aux = getattr(output, "aux_loss", None)
    if aux is None:
        return output.loss
    return output.loss - model.config.router_aux_loss_coef * aux


def active_parameters(model: nn.Module) -> int:
    """Parameters one token runs through: all of them, less the experts its router did not pick."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    experts = getattr(config, "num_local_experts", None)
    if not experts:
        return total
    unused = experts - config.num_experts_per_tok
    per_expert = 3 * config.hidden_size * config.intermediate_size
    return total - unused * per_expert * config.num_hidden_layers
