"""A prefix that starts as real tokens (Li & Liang 2021, §5.3): init="tokens".

A random prefix (PEFT's default, E ~ N(0, 1)) puts n key/value rows in front of every layer that no
input could produce; the untrained model is broken by it (SmolLM2 on the demo task: held-out answer
loss 3.42 -> 11.39 before any step). Starting from the keys and values the frozen model itself
computes for n real tokens t_1..t_n avoids that:

    run the model (prefixes off) on t_1..t_n at positions 0..n-1 with a KV cache,
    P[t] = [K_1[t] V_1[t] K_2[t] V_2[t] ... K_L[t] V_L[t]]     (PEFT's row layout, one row per token)

Keys are cached after any rotary embedding, and the model places the input after a cached prefix
at positions n.., so the untrained prefix acts exactly as if t_1..t_n were written in front of the
input: logits(prefix + x) = logits(t_1..t_n x)[n:]. The table is an ordinary prefix table, so the
saved adapter is an ordinary PEFT PREFIX_TUNING folder.

With prefix_projection (P = W2·tanh(W1·E + b1) + b2), E, W1 and b1 keep their random start, b2 is the
mean row of the target T and W2 is the least-squares (minimum-norm) solution of H·W2ᵀ = T - b2 for
H = tanh(W1·E + b1); with encoder_hidden_size >= n, H has full row rank and P = T up to rounding.

Which tokens: `token_ids` in PrefixConfig, exactly n of them. `prefix_token_ids` makes them from a
text, the tokenizer's own encoding repeated (as PEFT's prompt-tuning init_text) and cut to n;
`lorakit train` uses DEFAULT_TEXT, a task-neutral sentence, unless told otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import LorakitError

DEFAULT_TEXT = "The following is a clear and careful piece of writing, and each answer in it is short and correct."


def prefix_token_ids(tokenizer, text: str, n: int) -> list[int]:
    """`text` as the tokenizer encodes it, repeated to n ids (or cut to n)."""
    if not isinstance(text, str) or not text.strip():
        raise LorakitError(f"prefix init text={text!r} is invalid: give a non-empty text")
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise LorakitError(f"prefix init text={text!r} encodes to no tokens; give a longer text")
    return (ids * (n // len(ids) + 1))[:n]


def tokens_table(model: nn.Module, token_ids: list[int], shape) -> Tensor:
    """P (n x L·2·D, fp32): the keys and values `model` computes for `token_ids`, with prefixes off."""
    from .prefix import HOLDER, backbone

    core = backbone(model)
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and max(token_ids) >= vocab:
        raise LorakitError(
            f"token_ids holds {max(token_ids)}, outside this model's vocabulary of {vocab}; give ids < {vocab}"
        )
    holder = core._modules.get(HOLDER)
    saved = (holder.active, holder.row_prefixes) if holder is not None else None
    training = model.training
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    ids = torch.tensor([token_ids], device=weight.device if weight is not None else None)
    try:
        if holder is not None:
            holder.active, holder.row_prefixes = None, None
        model.eval()
        with torch.no_grad():
            out = core(input_ids=ids, use_cache=True)
    finally:
        model.train(training)
        if holder is not None:
            holder.active, holder.row_prefixes = saved
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)  # transformers before the rename
    layers = getattr(cache, "layers", None)
    if not layers:
        raise LorakitError(
            f"{type(core).__name__} returns no KV cache, so init='tokens' has no keys and values to start from "
            "(an encoder); use init='random' or 'zero'"
        )
    return _table(layers, shape, len(token_ids))


def _table(layers, shape, n: int) -> Tensor:
    want = (1, shape.num_heads, n, shape.head_dim)
    rows = []
    for layer in layers:
        k, v = layer.keys, layer.values
        if len(layers) != shape.num_layers or tuple(k.shape) != want or tuple(v.shape) != want:
            raise LorakitError(
                f"the model's KV cache is {len(layers)} layers of {tuple(k.shape)}, not {shape.num_layers} of "
                f"{want}; init='tokens' cannot lay it out as a prefix (use init='random')"
            )
        rows += [k[0].permute(1, 0, 2).flatten(1), v[0].permute(1, 0, 2).flatten(1)]
    return torch.cat(rows, dim=1).float()  # (n, L·2·D), token-major as PEFT lays it out


def start_at(encoder: nn.Module, target: Tensor) -> None:
    """Make `encoder.table()` equal `target` (plain: copy; projected: solve W2, b2 as the docstring says)."""
    with torch.no_grad():
        if not encoder.projected:
            encoder.embedding.copy_(target)
            return
        if encoder.w1.shape[0] < target.shape[0]:
            raise LorakitError(
                f"init='tokens' with prefix_projection needs encoder_hidden_size >= num_virtual_tokens "
                f"({encoder.w1.shape[0]} < {target.shape[0]}); raise it or use init='random'"
            )
        hidden = torch.tanh(encoder.embedding @ encoder.w1.T + encoder.b1).double()
        bias = target.double().mean(dim=0)
        w2t = torch.linalg.pinv(hidden) @ (target.double() - bias)  # minimum-norm exact solution (full row rank)
        encoder.w2.copy_(w2t.T)
        encoder.b2.copy_(bias)
