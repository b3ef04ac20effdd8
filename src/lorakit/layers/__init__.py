"""LoRA layers: each wraps a frozen base layer and holds any number of named adapters."""

from torch import nn

from ..errors import LorakitError
from .base import AdapterSpec, LoraWrapper
from .conv import Conv
from .embedding import Embedding
from .experts import ExpertParameter, innermost, parameter_layers
from .linear import Linear, is_gpt2_conv1d
from .saved_module import SavedModule

__all__ = [
    "AdapterSpec",
    "LoraWrapper",
    "Linear",
    "Embedding",
    "Conv",
    "SavedModule",
    "ExpertParameter",
    "innermost",
    "parameter_layers",
    "wrap",
    "is_adaptable",
    "layer_class",
    "is_gpt2_conv1d",
]


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_gpt2_conv1d(module)


def layer_class(module: nn.Module) -> type[LoraWrapper]:
    """The LoRA layer class that wraps `module`: the one place that maps base layer kinds to wrappers."""
    if isinstance(module, nn.Embedding):
        return Embedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Conv
    if isinstance(module, nn.Linear) or is_gpt2_conv1d(module):
        return Linear
    raise LorakitError(
        f"{type(module).__name__} cannot be adapted; LoRA wraps Linear, GPT-2 Conv1D, Embedding and Conv1d/2d/3d"
    )


def wrap(module: nn.Module) -> LoraWrapper:
    """The LoRA layer for `module` (which it keeps as `base_layer`)."""
    return layer_class(module)(module)
