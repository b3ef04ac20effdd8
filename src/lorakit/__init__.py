"""lorakit: LoRA (Low-Rank Adaptation) for any PyTorch model.

h = W0·x + s·B·A·x,   A (r x k), B (d x r), s = alpha / r,   B = 0 at the start

import lorakit
model = lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
lorakit.save_adapter(model, "out/sql")
"""

from .adapters import (
    ParameterCount,
    active_adapter,
    count_parameters,
    delete_adapter,
    disabled,
    list_adapters,
    merge,
    merge_and_unload,
    merged_adapter,
    set_adapter,
    set_trainable,
    unmerge,
)
from .combine import CombineReport, combine
from .config import LoraConfig
from .errors import LorakitError
from .formats import load_adapter, save_adapter
from .inject import inject
from .per_row import per_row
from .prefix import PrefixConfig, active_prefix, add_prefix, delete_prefix, list_prefixes, set_prefix

__version__ = "0.1.0"

__all__ = [
    "CombineReport",
    "LoraConfig",
    "LorakitError",
    "ParameterCount",
    "PrefixConfig",
    "active_adapter",
    "active_prefix",
    "add_prefix",
    "combine",
    "count_parameters",
    "delete_adapter",
    "delete_prefix",
    "disabled",
    "inject",
    "list_adapters",
    "list_prefixes",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "merged_adapter",
    "per_row",
    "save_adapter",
    "set_adapter",
    "set_prefix",
    "set_trainable",
    "unmerge",
]
