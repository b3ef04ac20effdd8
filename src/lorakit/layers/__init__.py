"""LoRA layers: each wraps a frozen base layer and holds any number of named adapters."""

from torch import nn

from .base import AdapterSpec, LoraLayer
from .conv import Conv
from .embedding import Embedding
from .linear import Linear, is_gpt2_conv1d
from .saved_module import SavedModule

__all__ = ["AdapterSpec", "LoraLayer", "Linear", "Embedding", "Conv", "SavedModule", "wrap", "is_adaptable"]


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_gpt2_conv1d(module)


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA layer for `module` (which it keeps as `base_layer`)."""
    if isinstance(module, nn.Embedding):
        return Embedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Conv(module)
    return Linear(module)
