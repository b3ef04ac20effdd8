"""Reading a safetensors file with its header metadata (where diffusers, kohya and lorakit keep configs).

Only the safetensors format is read (no pickle); a file that is not one gets one clear line.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LorakitError


def read_with_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise LorakitError(f"{path} is not a readable safetensors file ({err}); re-save it") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Only the header metadata, without reading any tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise LorakitError(f"{path} is not a readable safetensors file ({err}); re-save it") from None
