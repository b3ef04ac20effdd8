"""Managing the adapters on a model: switch, disable, delete, merge, unmerge, count, unload.

Merging is always explicit: W0 ← W0 + s·B·A (or DoRA's rescaled form) in every adapted layer,
and unmerge subtracts the same ΔW again. Nothing here happens as a side effect of train()/eval().
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .config import LoraConfig
from .errors import LorakitError, merged_error
from .layers import LoraWrapper, SavedModule, innermost
from .model_state import adapter_configs, bias_backups, lora_layers, require_adapter, saved_modules, set_submodule, walk
from .quant.convert import dequantize_base


def list_adapters(model: nn.Module) -> list[str]:
    return list(adapter_configs(model))


def active_adapter(model: nn.Module) -> str | None:
    return model.__dict__.get("lorakit_active")


def merged_adapter(model: nn.Module) -> str | None:
    return next((layer.merged for _, layer in lora_layers(model) if layer.merged is not None), None)


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Make `name` the adapter every forward uses; None runs the base model."""
    if name is not None:
        require_adapter(model, name)
    merged = merged_adapter(model)
    if merged is not None and merged != name:
        raise merged_error(merged, "switching")
    for _, module in walk(model):
        if isinstance(module, (LoraWrapper, SavedModule)):
            module.active = name
    model.__dict__["lorakit_active"] = name
    return model


def set_trainable(model: nn.Module, name: str) -> None:
    """Freeze everything, then unfreeze adapter `name` (its A, B, DoRA m, saved modules, biases)."""
    require_adapter(model, name)
    model.requires_grad_(False)
    adapted = set()
    for path, layer in lora_layers(model):
        if name in layer.specs:
            adapted.add(path)
        for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
            if name in store:
                store[name].requires_grad_(True)
    for _, holder in saved_modules(model):
        if name in holder.copies:
            holder.copies[name].requires_grad_(True)
    for param in owned_biases(model, adapter_configs(model)[name], adapted).values():
        param.requires_grad_(True)


def is_shared_bias(param_name: str) -> bool:
    """A bias of the base model (not of an adapter or of a modules_to_save copy)."""
    inside_wrapper = any(part in param_name for part in (".lora_", ".copies.", ".original_module."))
    return param_name.endswith("bias") and not inside_wrapper


def canonical(param_name: str) -> str:
    """A base parameter's name as in the unwrapped model ("x.base_layer.bias" -> "x.bias")."""
    return param_name.replace(".base_layer.", ".").replace(".original_module.", ".")


def owned_biases(model: nn.Module, config: LoraConfig, adapted: set[str], exclude: set[str] = frozenset()) -> dict:
    """The base biases an adapter trains and saves, by canonical name: none, every shared bias ("all"), or
    those of its adapted layers ("lora_only"). Biases inside `exclude` (modules_to_save) belong to the copy."""
    if config.bias == "none":
        return {}
    owned = {}
    for param_name, param in model.named_parameters():
        name = canonical(param_name)
        if not is_shared_bias(param_name) or any(name.startswith(p + ".") for p in exclude):
            continue
        if config.bias == "all" or name.rsplit(".", 1)[0] in adapted:
            owned[name] = param
    return owned


@contextmanager
def disabled(model: nn.Module):
    """Run the base model inside the block; the previous adapter (merged or not) comes back after."""
    previous, merged = active_adapter(model), merged_adapter(model)
    unmerge(model)
    set_adapter(model, None)
    try:
        yield model
    finally:
        set_adapter(model, previous)
        if merged is not None:
            merge(model)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name` everywhere; layers left with no adapter become their base layer again."""
    require_adapter(model, name)
    for path, layer in reversed(list(lora_layers(model))):  # innermost first, so nested wrappers unwind
        if name in layer.specs:
            layer.delete_adapter(name)
            if not layer.specs:
                set_submodule(model, path, layer.base_layer)
    for path, holder in list(saved_modules(model)):
        holder.delete_copy(name)
        if not holder.copies:
            set_submodule(model, path, holder.original_module)
    _restore_biases(model, name)
    del adapter_configs(model)[name]
    if active_adapter(model) == name:
        set_adapter(model, None)
    return model


def _restore_biases(model: nn.Module, name: str) -> None:
    """Biases are shared with the base: an adapter that set or trained them gives the old values back."""
    backup = bias_backups(model).pop(name, {})
    params = {canonical(n): p for n, p in model.named_parameters()} if backup else {}
    with torch.no_grad():
        for param_name, value in backup.items():
            params[param_name].copy_(value)


def _check_untied(model: nn.Module) -> None:
    owners: dict[int, list[str]] = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(param_name)
    for path, layer in lora_layers(model):
        names = owners.get(id(layer.weight_param()), [])
        if len(names) > 1 and layer.live_adapter() is not None:
            raise LorakitError(
                f"'{path}' shares its weight with {names[1] if names[0].startswith(path) else names[0]} (tied "
                "embeddings); "
                "merging would change both: untie them first or keep the adapter unmerged"
            )


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights: same outputs, no extra latency. Idempotent."""
    name = active_adapter(model)
    if name is None:
        raise LorakitError("no active adapter to merge; call lorakit.set_adapter(model, name) first")
    if merged_adapter(model) == name:
        return model
    _check_untied(model)
    for _, layer in lora_layers(model):
        layer.merge(name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take the merged adapter out of the base weights again (W0 back to float rounding). Idempotent."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and remove every lorakit module: a plain model remains.

    A quantized base (lorakit.quant) comes back as fp32: merged layers cannot go back to 4 or 8 bits
    without losing most of the update (`lorakit.quant.merge_precision` measures it)."""
    if active_adapter(model) is not None:
        merge(model)
    for path, layer in reversed(list(lora_layers(model))):  # innermost first, so nested wrappers unwind
        set_submodule(model, path, layer.base_layer)
    for path, holder in list(saved_modules(model)):
        set_submodule(model, path, holder.current())
    for key in ("lorakit_configs", "lorakit_active", "lorakit_bias_backups"):
        model.__dict__.pop(key, None)
    dequantize_base(model)
    return model


class ParameterCount(tuple):
    """(trainable, total), exact; print() it for a table of the adapted modules."""

    def __new__(cls, trainable: int, total: int, rows: list[tuple[str, str, str, str, int]]):
        count = super().__new__(cls, (trainable, total))
        count.rows = rows
        return count

    @property
    def trainable(self) -> int:
        return self[0]

    @property
    def total(self) -> int:
        return self[1]

    def __str__(self) -> str:
        header = ("module", "type", "d x k", "adapters (r)", "trainable")
        rows = [header] + [(p, t, s, a, f"{n:,}") for p, t, s, a, n in self.rows]
        widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {share:.4f}")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters (each shared tensor counted once), with a per-module table."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    rows = []
    for path, layer in lora_layers(model):
        adapters = ", ".join(f"{n}({s.r})" for n, s in layer.specs.items())
        nested = {id(p) for p in layer.base_layer.parameters()} if isinstance(layer.base_layer, LoraWrapper) else set()
        n_trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad and id(p) not in nested)
        shape = f"{layer.out_dim} x {layer.in_dim}"
        kind = type(layer.base_layer).__name__
        if layer.parameter_name is not None:
            path, kind = layer.target_key(path), f"{type(innermost(layer)).__name__} parameter"
        rows.append((path, kind, shape, adapters, n_trainable))
    for path, holder in saved_modules(model):
        n_trainable = sum(p.numel() for p in holder.parameters() if p.requires_grad)
        rows.append((path, type(holder.original_module).__name__, "full copy", ", ".join(holder.copies), n_trainable))
    return ParameterCount(trainable, total, rows)
