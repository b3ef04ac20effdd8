"""Loading an adapter in any format lorakit reads: detect it, convert it to PEFT's layout, load that.

    peft       a folder with adapter_config.json + adapter_model.safetensors (lorakit's own format)
    diffusers  pytorch_lora_weights.safetensors (a folder or the file): PEFT-style keys, maybe under
               unet. / transformer. / text_encoder., the config in the header
    kohya      one .safetensors file with lora_unet_* / lora_te_* keys (.lora_down / .lora_up / .alpha)

Every format ends as (PEFT config dict, tensors keyed base_model.model.<path>.lora_A.weight ...), so all of
them go through the one checked attach path (peft_read.attach_file -> attach.plan_file / apply); the base
fingerprint in the file's header (if any) is checked first: a different base warns, or is refused with strict=True.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import fingerprint
from ..errors import LorakitError
from .safetensors_file import read_metadata

READ_FORMATS = ("peft", "diffusers", "kohya")


def detect(path: str | Path) -> str:
    """The format of the adapter at `path` (a folder or a .safetensors file)."""
    from .diffusers import WEIGHTS_FILE, weights_file
    from .peft import CONFIG_FILE

    path = Path(path)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return "peft"
    if path.is_dir() and not (path / WEIGHTS_FILE).is_file() and not list(path.glob("*.safetensors")):
        raise LorakitError(
            f"{path} holds no adapter: no {CONFIG_FILE} (PEFT), no {WEIGHTS_FILE} (diffusers), no .safetensors file"
        )
    if not path.exists():
        raise LorakitError(f"adapter {path} does not exist; give an adapter folder or .safetensors file")
    from safetensors import safe_open

    file = weights_file(path)
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    if keys and all(k.startswith("lora_") for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        raise LorakitError(f"{file} is a PEFT adapter's weights without its adapter_config.json; give the folder")
    return "diffusers"


def read_any(
    model: nn.Module, path: str | Path, format: str | None = None, prefix: str | None = None
) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(PEFT config dict, PEFT-layout tensors, header metadata) of the adapter at `path`, for `model`."""
    format = format or detect(path)
    if format == "peft":
        from .peft import WEIGHTS_FILE
        from .peft_read import read_adapter

        config, tensors = read_adapter(path)
        return config, tensors, read_metadata(Path(path) / WEIGHTS_FILE)
    if format == "diffusers":
        from .diffusers import read_diffusers

        return read_diffusers(path, prefix=prefix, model=model)
    if format == "kohya":
        from .kohya import read_kohya

        return read_kohya(path, model, prefix=prefix)
    raise LorakitError(f"format={format!r} is not one lorakit reads; use one of {', '.join(READ_FORMATS)}")


def load_adapter(
    model: nn.Module,
    path: str | Path,
    name: str = "default",
    trainable: bool = False,
    activate: bool = True,
    freeze: bool = True,
    allow_base_changes: bool = True,
    format: str | None = None,
    prefix: str | None = None,
    strict: bool = False,
) -> nn.Module:
    """Add the adapter at `path` as `name`; returns the model. Any format lorakit reads (detected, or format=
    "peft" | "diffusers" | "kohya"; prefix= picks a diffusers pipeline component or a kohya prefix).

    The adapter's base fingerprint, when it has one, is checked first: other base weights warn
    (BaseMismatchWarning), or raise with strict=True. Then the one attach path (attach.plan_file) checks
    every tensor before anything changes; trainable / activate / freeze / allow_base_changes as there.
    """
    from .peft_read import attach_file, parse_adapter

    config, tensors, metadata = read_any(model, path, format=format, prefix=prefix)
    fingerprint.check(model, fingerprint.from_metadata(metadata), strict=strict, source=f"adapter {path}")
    return attach_file(model, parse_adapter(config, tensors), name, trainable, activate, freeze, allow_base_changes)


load = load_adapter  # the name formats.detect had before the attach path landed
