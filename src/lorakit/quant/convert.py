"""Putting a model's frozen base into a storage format, and taking it out again.

Formats (`base_dtype`): "fp32" (unchanged), "bf16" / "fp16" (16-bit storage), "int8" (one
scale per output row), "int4" (scale and zero per 32 inputs; int4.py says why this and not NF4).
Under "int4" the token embedding and the output head get int8, as llama.cpp's Q4 files keep
`token_embd` / `output` at 8 bits or more: the logits are where 4-bit error shows most, and
those two tables are a small part of a model's weights. A layer whose shape the int4 kernel
cannot take (outputs not in blocks of 16, inputs not in groups of 32) also gets int8.

What changes: nn.Linear and GPT-2 Conv1D layers become QuantLinear (frozen), nn.Embedding becomes
QuantEmbedding, a tied embedding and head share one storage. What does not: norms, biases,
convolutions, adapters, and modules_to_save (SavedModule) layers, which stay fp32; a new trainable
copy of a quantized layer (modules_to_save added later) is made from its fp32 dequantization.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LorakitError
from ..layers import LoraWrapper, SavedModule
from ..layers.linear import is_gpt2_conv1d
from . import int4
from .embedding import QuantEmbedding
from .half import HalfWeight
from .int4 import Int4Weight
from .int8 import Int8Weight
from .linear import QuantLinear

FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "int8": "int8",
    "int4": "int4",
}
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def base_format(value) -> str:
    """The format name for a `base_dtype` given as a string or torch dtype ("fp32", "bf16", "int8", "int4")."""
    if isinstance(value, torch.dtype) and value in _DTYPES:
        return _DTYPES[value]
    if isinstance(value, str) and value.lower() in _ALIASES:
        return _ALIASES[value.lower()]
    raise LorakitError(
        f"base_dtype={value!r} is not supported; use one of {', '.join(FORMATS)} (or torch.bfloat16 / torch.float16)"
    )


def storage_for(weight: torch.Tensor, kind: str) -> nn.Module:
    """Storage of kind "int4", "int8", "bf16" or "fp16" for a (N x K) weight (int4 falls back to int8
    for shapes its kernel cannot take)."""
    if kind == "int4":
        return Int4Weight.quantize(weight) if int4.supports(*weight.shape) else Int8Weight.quantize(weight)
    if kind == "int8":
        return Int8Weight.quantize(weight)
    return HalfWeight.quantize(weight, torch.bfloat16 if kind == "bf16" else torch.float16)


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, "lorakit_quantized", False)


def _frozen_layers(module: nn.Module, prefix: str = ""):
    """(parent, attribute, path, layer) for every Linear / Conv1D / Embedding of the base: all of them
    except those inside a SavedModule (modules_to_save: trained whole), which stay as they are."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, SavedModule) or is_quantized(child):
            continue
        kind = isinstance(child, (nn.Linear, nn.Embedding)) or is_gpt2_conv1d(child)
        if kind and child.weight.is_floating_point():
            yield module, name, path, child
        elif not kind:
            yield from _frozen_layers(child, path + ".")


def _head_weight_ids(model: nn.Module) -> set[int]:
    """ids of the weights that int4 keeps at 8 bits: embeddings and the output head."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and not is_quantized(m)}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head = head.base_layer if isinstance(head, LoraWrapper) else head
    if head is not None and not is_quantized(head) and getattr(head, "weight", None) is not None:
        ids.add(id(head.weight))
    return ids


@torch.no_grad()
def quantize_base(model: nn.Module, fmt: str) -> dict[str, int]:
    """Store every base Linear / Conv1D / Embedding of `model` in `fmt`, in place, layer by layer.

    Returns {storage kind: number of layers}. fp32 changes nothing.
    """
    fmt = base_format(fmt)
    if fmt == "fp32":
        return {}
    heads = _head_weight_ids(model) if fmt == "int4" else set()
    shared: dict[int, nn.Module] = {}  # id(original weight) -> storage, so tied weights stay tied
    counts: dict[str, int] = {}
    for parent, name, _, layer in list(_frozen_layers(model)):
        conv1d = is_gpt2_conv1d(layer)
        weight = layer.weight.t() if conv1d else layer.weight
        storage = shared.get(id(layer.weight))
        if storage is None:
            kind = "int8" if id(layer.weight) in heads else fmt
            storage = shared[id(layer.weight)] = storage_for(weight, kind)
        if isinstance(layer, nn.Embedding):
            if storage.kind == "int4":  # a table tied to an int4 layer: give it rows of its own
                storage = Int8Weight.quantize(layer.weight)
            new = QuantEmbedding(storage, padding_idx=layer.padding_idx)
        else:
            new = QuantLinear(storage, bias=layer.bias, from_conv1d=conv1d)
        setattr(parent, name, new)
        if isinstance(parent, LoraWrapper):
            parent.base_changed()  # a quantized GPT-2 Conv1D holds W as (out x in), as a Linear does
        counts[storage.kind] = counts.get(storage.kind, 0) + 1
    model.__dict__["lorakit_base_format"] = fmt
    return counts


@torch.no_grad()
def dequantize_base(model: nn.Module) -> int:
    """Replace every quantized layer with an ordinary fp32 one (tied tables tied again); returns how many."""
    tied: dict[int, nn.Parameter] = {}
    count = 0
    found = [(owner, name, child) for owner in model.modules() for name, child in owner.named_children()]
    for parent, name, layer in [entry for entry in found if is_quantized(entry[2])]:
        plain = layer.dequantized()
        key = id(layer.storage)
        if key in tied and not getattr(layer, "from_conv1d", False):
            plain.weight = tied[key]
        else:
            tied[key] = plain.weight
        setattr(parent, name, plain)
        if isinstance(parent, LoraWrapper):
            parent.base_changed()
        count += 1
    model.__dict__.pop("lorakit_base_format", None)
    return count


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: quantized storages once each, plus every parameter and buffer."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        storage = getattr(module, "storage", None)
        if is_quantized(module) and id(storage) not in seen:
            seen.add(id(storage))
            total += storage.nbytes()
    for param in {id(p): p for p in model.parameters()}.values():
        total += param.numel() * param.element_size()
    return total


@torch.no_grad()
def merge_precision(model: nn.Module) -> list[tuple[str, str, float, float]]:
    """Before merging into a quantized base, per adapted layer: (path, storage kind, ||ΔW|| / ||W0||,
    relative error re-quantizing W0 + ΔW to that kind would add). Merging keeps fp32 (exact); this says
    what storing the merged model in the base's format again would cost, next to the update's own size."""
    rows = []
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraWrapper) or not is_quantized(layer.base_layer) or layer.live_adapter() is None:
            continue
        base = layer.weight_2d().float()
        merged = base + layer.delta_weight(layer.live_adapter()).float()
        kind = layer.base_layer.storage.kind
        change = (torch.linalg.vector_norm(merged - base) / torch.linalg.vector_norm(base).clamp_min(1e-30)).item()
        rows.append((path, kind, change, requantization_error(merged, kind)))
    return rows


def requantization_error(weight: torch.Tensor, kind: str) -> float:
    """||Q(W) - W|| / ||W||: the relative error storing `weight` in `kind` would add."""
    weight = weight.detach().float()
    back = storage_for(weight, kind).dequantize()
    return (torch.linalg.vector_norm(back - weight) / torch.linalg.vector_norm(weight).clamp_min(1e-30)).item()
