"""Where lorakit keeps its state on a model, and how it walks the model's modules.

The adapters' configs live in the model's own __dict__ (`lorakit_configs`), so a model carries
its adapters with it and there is no wrapper object around it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .config import LoraConfig
from .errors import LorakitError
from .layers import LoraWrapper, SavedModule

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,127}")


def check_adapter_name(name: object) -> None:
    """Adapter names are plain identifiers of at most 128 characters (they also name folders and URLs)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise LorakitError(
            f"adapter name {shown} is invalid: use a plain identifier (1-128 letters, digits, '_' or '-', starting "
            "with a letter or '_')"
        )


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters injected into `model`, by name (kept on the model itself)."""
    return model.__dict__.setdefault("lorakit_configs", {})


def bias_backups(model: nn.Module) -> dict[str, dict]:
    """Per adapter, the base biases as they were before it set or trained them (restored on delete)."""
    return model.__dict__.setdefault("lorakit_bias_backups", {})


def new_weights(model: nn.Module) -> list[str]:
    """Parameters the loader started at random because the checkpoint had none (e.g. a new classifier
    head): filled in by lorakit.models.load_model, checked by the commands that need trained ones."""
    return model.__dict__.setdefault("lorakit_new_weights", [])


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraWrapper]]:
    for path, module in walk(model):
        if isinstance(module, LoraWrapper):
            yield path, module


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Like named_modules() (depth first, in model order), but does not descend into lorakit's own
    wrappers, except into a wrapper nested in another (one per adapted parameter of a module).
    Iterative over `_modules`: a server walks the whole model on every hot load."""

    def children(parent: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
        return [(f"{path}.{n}" if path else n, c) for n, c in reversed(parent._modules.items()) if c is not None]

    stack = children(module, prefix)
    while stack:
        path, child = stack.pop()
        yield path, child
        if not isinstance(child, (LoraWrapper, SavedModule)):
            stack.extend(children(child, path))
        elif isinstance(getattr(child, "base_layer", None), LoraWrapper):  # wrappers nest (several parameters)
            stack.append((f"{path}.base_layer", child.base_layer))


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for path, module in walk(model):
        if isinstance(module, SavedModule):
            yield path, module


def require_adapter(model: nn.Module, name: str) -> None:
    configs = adapter_configs(model)
    if name not in configs:
        have = ", ".join(sorted(configs)) or "none (use lorakit.inject or lorakit.load_adapter)"
        raise LorakitError(f"no adapter named '{name}'; adapters on this model: {have}")


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)
