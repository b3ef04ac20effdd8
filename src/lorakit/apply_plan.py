"""Applying an AdapterPlan (attach.py) to the model: wrap, add factors, copy saved modules and biases,
step by step; if any step fails (out of memory), every earlier step is undone, so the model is exactly as
before. The checks all happened while planning; nothing here can refuse an adapter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import owned_biases, set_adapter, set_trainable
from .attach import AdapterPlan, LayerChange, SavedChange
from .errors import LorakitError
from .layers import SavedModule
from .model_state import adapter_configs, bias_backups, set_submodule


def apply(
    model: nn.Module,
    plan: AdapterPlan,
    *,
    trainable: bool = False,
    freeze: bool = True,
    activate: bool = True,
    generator: torch.Generator | None = None,
) -> None:
    """Make the planned change. trainable=True makes this adapter the only trainable part; otherwise
    freeze=True freezes the whole model (PEFT's inference mode) and freeze=False only the new tensors."""
    undo: list = []
    try:
        for change in plan.layers:
            _apply_layer(model, plan.name, change, generator, undo)
        for saved in plan.saved:
            _apply_saved(model, plan.name, saved, undo)
        _apply_biases(model, plan, undo)
    except BaseException as err:
        for step in reversed(undo):
            step()
        if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "alloc" in str(err).lower()):
            raise LorakitError(
                f"not enough memory to add adapter '{plan.name}' ({plan_parameters(plan):,} parameters); "
                "use a smaller r or fewer target modules"
            ) from None
        raise
    adapter_configs(model)[plan.name] = plan.config
    if trainable:
        set_trainable(model, plan.name)
    elif freeze:
        model.requires_grad_(False)
    else:
        for change in plan.layers:
            for store in (change.layer.lora_A, change.layer.lora_B, change.layer.lora_magnitude):
                if plan.name in store:
                    store[plan.name].requires_grad_(False)
        for saved in plan.saved:
            model.get_submodule(saved.path).copies[plan.name].requires_grad_(False)
    if activate:
        set_adapter(model, plan.name)


def plan_parameters(plan: AdapterPlan) -> int:
    """How many numbers the plan's new factors hold."""
    return sum(math.prod(c.layer._a_shape(c.spec.r)) + math.prod(c.layer._b_shape(c.spec.r)) for c in plan.layers)


def _apply_layer(model: nn.Module, name: str, change: LayerChange, generator, undo: list) -> None:
    layer = change.layer
    if layer is not change.module:
        set_submodule(model, change.path, layer)
        undo.append(lambda: set_submodule(model, change.path, change.module))
    before = layer.weight_param().detach().clone() if change.spec.init == "pissa" else None
    undo.append(lambda: layer.discard_adapter(name, restore_weight=before))
    layer.add_adapter(name, change.spec, generator=generator, factors=change.factors)
    if change.magnitude is not None:
        with torch.no_grad():
            layer.lora_magnitude[name].copy_(change.magnitude)


def _apply_saved(model: nn.Module, name: str, change: SavedChange, undo: list) -> None:
    holder = change.module if isinstance(change.module, SavedModule) else SavedModule(change.module)
    if holder is not change.module:
        set_submodule(model, change.path, holder)
        undo.append(lambda: set_submodule(model, change.path, change.module))
    undo.append(lambda: holder.delete_copy(name))
    holder.add_copy(name)
    if change.state:
        holder.copies[name].load_state_dict(change.state, strict=True)


def _apply_biases(model: nn.Module, plan: AdapterPlan, undo: list) -> None:
    """Biases are shared with the base: keep what was there, so deleting the adapter gives it back."""
    if plan.config.bias == "none":
        return
    adapted = {c.path for c in plan.layers}
    owned = owned_biases(model, plan.config, adapted, exclude={s.path for s in plan.saved})
    backup = {n: p.detach().clone() for n, p in owned.items()}

    def restore() -> None:
        with torch.no_grad():
            for n, value in backup.items():
                owned[n].copy_(value)
        bias_backups(model).pop(plan.name, None)

    undo.append(restore)
    bias_backups(model)[plan.name] = backup
    with torch.no_grad():
        for n, value in plan.biases.items():
            owned[n].copy_(value)
