"""Default LoRA targets from a model's structure: its attention query and value projections.

The LoRA paper adapts W_q and W_v. A known architecture takes its names from the table (PEFT's
per-architecture table as the starting point, in inject.DEFAULT_TARGETS); any other model is read:

  by name and shape   a Linear whose name is a usual query / value name (q_proj, query, q, wq, ...)
                      and whose shape fits: in = hidden size, out = heads x head_dim (query) or
                      key-value heads x head_dim (value); or a fused q,k,v projection (qkv_proj,
                      c_attn, query_key_value, Wqkv, ...) with out = (heads + 2 x kv heads) x head_dim;
  by name alone       the usual names whatever their shapes (also latent attention's q_b_proj, kv_b_proj);
  by shape alone      inside every attention block (a module whose name says attn / attention), the
                      projections reading the hidden state: the fused one if there is one, else the
                      first that is query-sized and the last that is value-sized (q, k, v order);
  otherwise           "all-linear" (state-space and recurrent models have no attention to find).

The result is a list of module-name suffixes, as `target_modules` takes.
"""

from __future__ import annotations

import logging

from torch import nn

from .errors import LorakitError
from .layers import LoraWrapper, is_gpt2_conv1d

log = logging.getLogger("lorakit.targets")
QUERY_NAMES = ("q_proj", "query", "q", "q_lin", "wq", "query_proj", "to_q", "q_linear", "project_q")
VALUE_NAMES = ("v_proj", "value", "v", "v_lin", "wv", "value_proj", "to_v", "v_linear", "project_v")
FUSED_NAMES = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "qkv", "W_pack", "in_proj_qkv", "qkv_linear")
# multi-head latent attention (DeepSeek-style): the query and the key/value up-projections
LATENT_NAMES = (("q_b_proj", "wq_b", "q_proj"), ("kv_b_proj", "kv_proj"))


def _config_int(config, *names: str) -> int | None:
    for name in names:
        try:
            value = getattr(config, name, None)
        except Exception:  # noqa: BLE001  (some configs refuse global reads of values that vary per layer)
            value = None
        if isinstance(value, int) and value > 0:
            return value
    return None


def _sizes(model: nn.Module) -> tuple[int, int, int, int] | None:
    """(hidden, query out, value out, fused q,k,v out) from the model's config, if it says."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model", "dim", "model_dim")
    heads = _config_int(config, "num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads")
    if hidden is None or heads is None:
        return None
    kv_heads = _config_int(config, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num") or heads
    head_dim = _config_int(config, "head_dim", "d_kv") or hidden // heads
    return hidden, heads * head_dim, kv_heads * head_dim, (heads + 2 * kv_heads) * head_dim


def _projections(model: nn.Module) -> list[tuple[str, int, int]]:
    """(path, in, out) of every Linear-like layer except the output head, in model order."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    found = []
    for path, module in model.named_modules():
        if isinstance(module, LoraWrapper) or module is head or path.endswith("lm_head"):
            continue
        if is_gpt2_conv1d(module):
            found.append((path, module.weight.shape[0], module.weight.shape[1]))
        elif isinstance(module, nn.Linear):
            found.append((path, module.in_features, module.out_features))
    return found


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _by_name(layers, sizes) -> list[str]:
    hidden, q_out, v_out, fused_out = sizes
    fused = {_leaf(p) for p, i, o in layers if _leaf(p) in FUSED_NAMES and i == hidden and o in (fused_out, 3 * hidden)}
    if fused:
        return sorted(fused)
    query = {_leaf(p) for p, i, o in layers if _leaf(p) in QUERY_NAMES and i == hidden and o == q_out}
    value = {_leaf(p) for p, i, o in layers if _leaf(p) in VALUE_NAMES and i == hidden and o == v_out}
    return sorted(query) + sorted(value) if query and value else []


def _by_shape(layers, sizes) -> list[str]:
    hidden, q_out, v_out, fused_out = sizes
    blocks: dict[str, list[tuple[str, int]]] = {}
    for path, inputs, outputs in layers:
        owner = path.rpartition(".")[0]
        if inputs == hidden and any(word in owner.lower() for word in ("attn", "attention")):
            blocks.setdefault(owner, []).append((_leaf(path), outputs))
    names: set[str] = set()
    for projections in blocks.values():
        fused = [n for n, o in projections if o == fused_out]
        queries = [n for n, o in projections if o == q_out]
        values = [n for n, o in projections if o == v_out]
        if fused:
            names.add(fused[0])
        elif q_out != v_out and queries and values:
            names |= {queries[0], values[-1]}
        elif len(queries) >= 3:  # q, k, v all the same size: take them in definition order
            names |= {queries[0], queries[2]}
    return sorted(names)


def _by_name_alone(leaves: set[str]) -> list[str]:
    """Usual names whatever their shapes (attention narrower than the hidden state, latent attention)."""

    def pair(queries, values) -> list[str]:
        query, value = [n for n in queries if n in leaves], [n for n in values if n in leaves]
        return [query[0], value[0]] if query and value else []

    fused = sorted(leaves & set(FUSED_NAMES))
    return pair(QUERY_NAMES, VALUE_NAMES) or fused[:1] or pair(*LATENT_NAMES)


def default_targets(model: nn.Module, table: dict[str, list[str]]) -> list[str] | str:
    """`table`'s entry for the model type if its names exist in the model, else the attention q/v
    projections found by name and shape, by shape, or by name alone; a model without attention
    (state-space, recurrent) gets "all-linear"."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layers = _projections(model)
    leaves = {_leaf(p) for p, _, _ in layers}
    known = table.get(model_type)
    if known is not None and (isinstance(known, str) or leaves & set(known)):
        return known
    sizes = _sizes(model)
    found = (_by_name(layers, sizes) if sizes else []) or _by_name_alone(leaves)
    found = found or (_by_shape(layers, sizes) if sizes else [])
    if found:
        log.info("model type %r: default targets %s, found by name and shape", model_type, ", ".join(found))
        return found
    if not layers:
        raise LorakitError(
            f"LoraConfig.target_modules is not set and model type {model_type!r} has no Linear layers to adapt; "
            "set target_modules"
        )
    log.info("model type %r has no attention projections lorakit recognises: adapting all linear layers", model_type)
    return "all-linear"
