"""What `lorakit train --method` trains and how the result is laid out on disk (the one home of both).

    lora          a LoRA adapter:             adapter/          PEFT LORA folder
    prefix        a prefix (prefix tuning):   adapter/          PEFT PREFIX_TUNING folder
    lora+prefix   both, on the same model:    adapter/          PEFT LORA folder
                                              adapter/prefix/   PEFT PREFIX_TUNING folder

Each folder loads in PEFT on its own (PeftModel.from_pretrained); `lorakit generate` / `eval`
(`load_trained`) load whichever is there, and both when adapter/prefix/ exists.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

METHODS = ("lora", "prefix", "lora+prefix")
PREFIX_NAME = "prefix"  # the prefix's name on the training model
PREFIX_FOLDER = "prefix"  # where lora+prefix puts the prefix, inside the LoRA adapter folder


def trains(method: str, part: str) -> bool:
    """Whether `method` trains `part` ("lora" or "prefix")."""
    return part in method.split("+")


def save_trained(model: nn.Module, directory: Path, method: str, adapter_name: str) -> None:
    """Write what `method` trained into `directory` in the layout above."""
    from ..formats import save_adapter
    from ..formats.peft_prefix import save_prefix

    directory = Path(directory)
    if not trains(method, "lora"):
        save_prefix(model, directory, name=PREFIX_NAME)
        return
    save_adapter(model, directory, name=adapter_name)
    if trains(method, "prefix"):
        save_prefix(model, directory / PREFIX_FOLDER, name=PREFIX_NAME)


def load_trained(model: nn.Module, directory: str | Path, name: str) -> None:
    """Load an adapter folder of any method (or PEFT's LoRA / prefix folder) as `name`; a prefix found
    in DIR/prefix/ beside a LoRA adapter is loaded too, as `name`_prefix, and both are active."""
    from ..formats import load_adapter
    from ..formats.peft_prefix import is_prefix_folder, load_prefix

    directory = Path(directory)
    if is_prefix_folder(directory):
        load_prefix(model, directory, name=name)
        return
    load_adapter(model, directory, name=name)
    if is_prefix_folder(directory / PREFIX_FOLDER):
        load_prefix(model, directory / PREFIX_FOLDER, name=f"{name}_prefix")
