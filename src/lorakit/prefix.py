"""Prefix tuning (Li & Liang 2021): learned keys and values in front of every attention layer.

Layer l attends over [P_k^l ; K^l] and [P_v^l ; V^l], where the prefix P holds n virtual tokens
per layer that no input produced. All layers' prefixes are one table (PEFT's layout)

    P (n x L·2·D),  D = kv_heads · head_dim,   row t = [k_1 v_1 k_2 v_2 ... k_L v_L] of token t
    P = E                                   (plain: E is the table itself)
    P = W2·tanh(W1·E + b1) + b2             (prefix_projection: E (n x D) through an MLP)

The base model stays frozen; only E (and the MLP) train. The prefix enters attention the way PEFT
passes it, as a KV cache that already holds n tokens: a forward pre-hook on the backbone fills an
empty (or absent) cache with P, puts n ones in front of the attention mask and moves given position
ids up by n, so positions are those the model computes after n cached tokens. During generation
later steps find the prefix already in the cache and only need the mask and positions moved.

Prefixes are named like LoRA adapters and live beside them: a model can train a LoRA adapter and
a prefix together (`lorakit train --method lora+prefix`). They live in a `Prefixes` module on the
backbone (so they move, save and train with the model) and are switched with `set_prefix`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import LorakitError
from .model_state import adapter_configs, check_adapter_name
from .prefix_init import start_at, tokens_table

HOLDER = "lorakit_prefix"  # child module of the backbone that holds the prefixes
INITS = ("random", "zero", "tokens")


@dataclass
class PrefixConfig:
    """num_virtual_tokens: prefix length n. prefix_projection: train E (n x D) through a two-layer MLP
    of width encoder_hidden_size (default D) instead of P itself (PEFT's reparameterisation).
    init: "random" (PEFT's default: E ~ N(0, 1), MLP as nn.Linear), "zero" (P starts at 0) or "tokens"
    (P starts as the model's own keys and values of the n real tokens `token_ids`: prefix_init.py)."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: str = "random"
    token_ids: list[int] | None = None  # init="tokens": exactly num_virtual_tokens ids (prefix_token_ids)

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LorakitError(f"num_virtual_tokens={n!r} is invalid: give an integer >= 1, e.g. 20")
        if not isinstance(self.prefix_projection, bool):
            raise LorakitError(f"prefix_projection={self.prefix_projection!r} is invalid: use true or false")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise LorakitError(f"encoder_hidden_size={h!r} is invalid: give an integer >= 1 (or leave it unset)")
        if self.init not in INITS:
            raise LorakitError(f"init={self.init!r} is invalid for a prefix: choose {', '.join(INITS)}")
        self._check_token_ids()

    def _check_token_ids(self) -> None:
        ids, n = self.token_ids, self.num_virtual_tokens
        if self.init != "tokens":
            if ids is not None:
                raise LorakitError(f"token_ids is given but init={self.init!r}; token_ids go with init='tokens'")
            return
        if isinstance(ids, tuple):
            ids = self.token_ids = list(ids)
        if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise LorakitError(
                f"token_ids={ids!r} is invalid for init='tokens': give a list of {n} token ids (integers >= 0), "
                "e.g. lorakit.prefix_init.prefix_token_ids(tokenizer, text, n)"
            )
        if len(ids) != n:
            raise LorakitError(
                f"token_ids has {len(ids)} ids but num_virtual_tokens={n}; init='tokens' needs exactly one id per "
                "virtual token"
            )


@dataclass(frozen=True)
class PrefixShape:
    """What a prefix must look like for one model: layers, key/value heads, head size."""

    num_layers: int
    num_heads: int  # key/value heads (grouped-query attention stores fewer than the query heads)
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def width(self) -> int:
        """Columns of P: keys and values of every layer."""
        return self.num_layers * 2 * self.token_dim


def prefix_shape(model: nn.Module) -> PrefixShape:
    """The prefix shape of a Hugging Face decoder or encoder, read from its config as PEFT reads it."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise LorakitError(
            f"{type(model).__name__} has no Hugging Face config; prefix tuning needs a transformers model"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise LorakitError(
            f"{type(model).__name__} is an encoder-decoder model; lorakit's prefix tuning supports decoders and "
            "encoders"
        )
    values = config.get_text_config().to_dict() if hasattr(config, "get_text_config") else config.to_dict()
    layers = _first(values, ("num_hidden_layers", "num_layers", "n_layer"))
    hidden = _first(values, ("hidden_size", "n_embd", "d_model"))
    heads = _first(values, ("num_attention_heads", "n_head", "num_heads"))
    if values.get("per_layer_config") or values.get("global_head_dim"):
        raise LorakitError(
            f"{type(model).__name__} has layers of different key/value shapes; prefix tuning needs one shape"
        )
    head_dim = values.get("head_dim") or hidden // heads
    kv_heads = values.get("num_key_value_heads") or heads
    return PrefixShape(num_layers=layers, num_heads=kv_heads, head_dim=head_dim)


def _first(values: dict, keys: tuple[str, ...]) -> int:
    for key in keys:
        if isinstance(values.get(key), int):
            return values[key]
    raise LorakitError(f"the model config has none of {', '.join(keys)}; prefix tuning cannot size the prefix")


class PrefixEncoder(nn.Module):
    """Holds E (and the MLP) of one prefix; `table()` gives P (n x L·2·D).

    Plain tensors rather than nn.Linear / nn.Embedding, so LoRA's target search never adapts them."""

    def __init__(
        self,
        config: PrefixConfig,
        shape: PrefixShape,
        generator: torch.Generator | None = None,
        table: Tensor | None = None,
    ):
        super().__init__()
        self.config, self.shape = config, shape
        n = config.num_virtual_tokens
        if table is not None:  # loaded from a file: P itself (PEFT saves P, never the MLP)
            self.embedding = nn.Parameter(table.detach().to(torch.float32).clone())
            self.projected = False
            return
        self.projected = config.prefix_projection
        hidden = config.encoder_hidden_size or shape.token_dim
        with torch.no_grad():
            if self.projected:
                self.embedding = nn.Parameter(torch.randn(n, shape.token_dim, generator=generator))
                self.w1, self.b1 = _linear(shape.token_dim, hidden, generator)
                self.w2, self.b2 = _linear(hidden, shape.width, generator)
                if config.init == "zero":
                    self.w2.zero_()
                    self.b2.zero_()
            else:
                self.embedding = nn.Parameter(torch.randn(n, shape.width, generator=generator))
                if config.init == "zero":
                    self.embedding.zero_()

    def table(self) -> Tensor:
        if not self.projected:
            return self.embedding
        hidden = torch.tanh(self.embedding @ self.w1.T + self.b1)
        return hidden @ self.w2.T + self.b2

    def extra_repr(self) -> str:
        mlp = ", MLP" if self.projected else ""
        return f"virtual_tokens={self.config.num_virtual_tokens}, layers={self.shape.num_layers}{mlp}"


def _linear(fan_in: int, fan_out: int, generator: torch.Generator | None) -> tuple[nn.Parameter, nn.Parameter]:
    """nn.Linear's default init (kaiming-uniform weight, uniform bias), drawn from `generator`."""
    bound = 1.0 / math.sqrt(fan_in)
    weight = torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=generator)
    bias = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
    return nn.Parameter(weight), nn.Parameter(bias)


class Prefixes(nn.Module):
    """The prefixes on one backbone, by name, and which one forward uses."""

    def __init__(self, shape: PrefixShape):
        super().__init__()
        self.shape = shape
        self.encoders = nn.ModuleDict()
        self.active: str | None = None
        self.row_prefixes: list[str | None] | None = None  # set by lorakit.per_row: one name (or None) per row

    def lengths(self, names: list[str | None]) -> list[int]:
        return [0 if n is None else self.encoders[n].config.num_virtual_tokens for n in names]

    def keys_values(self, names: list[str | None], dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """Per layer (K, V), each (rows, heads, n_max, head_dim); a row with a shorter prefix (or none)
        is zero-padded on the left, and the attention mask hides the padding."""
        s, n_max = self.shape, max(self.lengths(names))
        tables = {n: self.encoders[n].table() for n in dict.fromkeys(names) if n is not None}
        rows = []
        for name in names:
            row = tables[name] if name is not None else tables[next(iter(tables))].new_zeros((0, s.width))
            rows.append(nn.functional.pad(row, (0, 0, n_max - row.shape[0], 0)))
        p = torch.stack(rows).to(dtype)  # (rows, n_max, L·2·D)
        kv = p.view(len(names), n_max, 2 * s.num_layers, s.num_heads, s.head_dim).permute(2, 0, 3, 1, 4)
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(s.num_layers)]


# ----- the model-level API ----------------------------------------------------------------------
def backbone(model: nn.Module) -> nn.Module:
    """The module whose forward takes the KV cache (LlamaModel inside LlamaForCausalLM, BertModel, ...)."""
    inner = getattr(model, "base_model", model)
    return inner if isinstance(inner, nn.Module) else model


def prefixes(model: nn.Module) -> Prefixes | None:
    return backbone(model)._modules.get(HOLDER)


def list_prefixes(model: nn.Module) -> list[str]:
    holder = prefixes(model)
    return list(holder.encoders) if holder is not None else []


def active_prefix(model: nn.Module) -> str | None:
    holder = prefixes(model)
    return holder.active if holder is not None else None


def require_prefix(model: nn.Module, name: str) -> None:
    if name not in list_prefixes(model):
        have = ", ".join(list_prefixes(model)) or "none (use lorakit.add_prefix or lorakit.load_adapter)"
        raise LorakitError(f"no prefix named '{name}'; prefixes on this model: {have}")


def check_new_prefix_name(model: nn.Module, name: str) -> None:
    """Prefixes and LoRA adapters share one namespace, so a name says which one it is."""
    check_adapter_name(name)
    if name in list_prefixes(model) or name in adapter_configs(model):
        raise LorakitError(f"'{name}' already names an adapter or prefix on this model; delete it or pick another")


def attach_encoder(model: nn.Module, name: str, encoder: PrefixEncoder, activate: bool = True) -> None:
    """Put `encoder` on the model as prefix `name` (checked beforehand: nothing here can fail midway)."""
    core = backbone(model)
    holder = core._modules.get(HOLDER)
    if holder is None:
        holder = Prefixes(encoder.shape)
        core.add_module(HOLDER, holder)
        core.register_forward_pre_hook(_prefix_hook, with_kwargs=True)
    weight = next((p for p in core.parameters() if p.is_floating_point()), None)
    holder.encoders[name] = encoder.to(weight.device) if weight is not None else encoder
    if activate:
        holder.active = name


def add_prefix(model: nn.Module, config: PrefixConfig, name: str = "prefix", seed: int | None = None) -> nn.Module:
    """Add a new trainable prefix `name` and make it active; nothing else on the model changes
    (freeze the base first, e.g. with lorakit.inject or model.requires_grad_(False)). With init="tokens"
    the table starts as the model's keys and values of config.token_ids, computed as the model stands
    (LoRA adapters as they are, prefixes off)."""
    if not isinstance(config, PrefixConfig):
        raise LorakitError(f"add_prefix takes a lorakit.PrefixConfig, not {type(config).__name__}")
    check_new_prefix_name(model, name)
    shape = prefix_shape(model)
    _check_backbone(model)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    encoder = PrefixEncoder(config, shape, generator)
    if config.init == "tokens":
        start_at(encoder, tokens_table(model, config.token_ids, shape))
    attach_encoder(model, name, encoder)
    return model


def set_prefix(model: nn.Module, name: str | None) -> nn.Module:
    """Make prefix `name` the one forward uses; None turns prefixes off (LoRA adapters are unaffected)."""
    if name is not None:
        require_prefix(model, name)
    holder = prefixes(model)
    if holder is not None:
        holder.active = name
    return model


def delete_prefix(model: nn.Module, name: str) -> nn.Module:
    """Remove prefix `name`; with the last one gone the backbone is exactly as before (no hook, no module)."""
    require_prefix(model, name)
    core = backbone(model)
    holder = core._modules[HOLDER]
    del holder.encoders[name]
    if holder.active == name:
        holder.active = None
    if not len(holder.encoders):
        del core._modules[HOLDER]
        for key, hook in list(core._forward_pre_hooks.items()):
            if hook is _prefix_hook:
                del core._forward_pre_hooks[key]
                core._forward_pre_hooks_with_kwargs.pop(key, None)
    return model


def _check_backbone(model: nn.Module) -> None:
    if _cache_argument(backbone(model)) is None:
        raise LorakitError(
            f"{type(backbone(model)).__name__}.forward takes no KV cache (cache / past_key_values), which prefix "
            "tuning needs"
        )


# ----- the forward pre-hook ---------------------------------------------------------------------
_SIGNATURES: dict[type, list[str]] = {}


def _parameters(module: nn.Module) -> list[str]:
    kind = type(module)
    if kind not in _SIGNATURES:
        params = inspect.signature(module.forward).parameters.values()
        _SIGNATURES[kind] = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return _SIGNATURES[kind]


def _cache_argument(module: nn.Module) -> str | None:
    names = _parameters(module)
    return next((n for n in ("cache", "past_key_values") if n in names), None)


def _prefix_hook(core: nn.Module, args: tuple, kwargs: dict):
    holder = core._modules.get(HOLDER)
    if holder is None or (holder.active is None and holder.row_prefixes is None):
        return None
    names = _parameters(core)
    if len(args) > len(names):
        raise LorakitError(f"{type(core).__name__} got more positional arguments than it has parameters")
    kwargs = {**dict(zip(names, args)), **kwargs}
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        return None
    rows = inputs.shape[0]
    key = _cache_argument(core)
    cache = kwargs.get(key)
    if cache is None or _cache_length(cache) == 0:
        wanted = holder.row_prefixes if holder.row_prefixes is not None else [holder.active] * rows
        if len(wanted) != rows:
            raise LorakitError(
                f"per_row was given {len(wanted)} names but the batch has {rows} rows; pass one name per row"
            )
        if all(n is None for n in wanted):
            return None
        cache = _fill_cache(core, holder, cache, wanted)
        kwargs[key] = cache
    lengths = getattr(cache, "lorakit_prefix_lengths", None)
    if lengths is None:
        raise LorakitError(
            "a prefix is active but the KV cache passed in already holds tokens without it; start from an empty "
            "cache (or turn the prefix off with lorakit.set_prefix(model, None))"
        )
    _shift_inputs(kwargs, lengths, rows)
    return ((), kwargs)


def _cache_length(cache) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    raise LorakitError(f"prefix tuning needs a transformers Cache object, not {type(cache).__name__}")


def _fill_cache(core: nn.Module, holder: Prefixes, cache, names: list[str | None]):
    """Write each row's prefix into `cache` (a new DynamicCache when None), as PEFT's get_prompt does."""
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache()
    dtype = core.get_input_embeddings().weight.dtype if hasattr(core, "get_input_embeddings") else torch.float32
    for layer, (k, v) in enumerate(holder.keys_values(names, dtype)):
        cache.update(k, v, layer)
    cache.lorakit_prefix_lengths = holder.lengths(names)
    return cache


def _shift_inputs(kwargs: dict, lengths: list[int], rows: int) -> None:
    """Mask and positions for the cached prefix: each row sees its own n_b prefix tokens (after any
    left padding of shorter prefixes) and its tokens start at position n_b, as they would alone."""
    n_max, uniform = max(lengths), len(set(lengths)) == 1
    inputs = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise LorakitError("prefix tuning needs a 2-d attention mask (batch x tokens), not a 4-d one")
    if mask is None and not uniform:
        mask = torch.ones(rows, inputs.shape[1], dtype=torch.long, device=inputs.device)
    if mask is not None:
        seen = torch.tensor([[0] * (n_max - n) + [1] * n for n in lengths], dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = torch.cat([seen, mask], dim=1)
    positions = kwargs.get("position_ids")
    if positions is None and uniform:
        return  # the model counts from the cache length, n, by itself
    if positions is None:
        positions = torch.arange(inputs.shape[1], device=inputs.device).expand(rows, -1)
    kwargs["position_ids"] = positions + torch.tensor(lengths, device=positions.device).view(rows, 1)
