"""What `lorakit export` and `lorakit verify` share: a base model of any kind, and an adapter in any format on it.

A folder whose config.json names a diffusers class (_class_name, e.g. UNet2DConditionModel) loads with
diffusers; anything else is a transformers model (task from the adapter's run.json / adapter_config.json).
The adapter may be a PEFT folder, a diffusers LoRA or a kohya file (formats/detect.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from ..io import read_json

PROBE_TEXT = "LoRA adds a low-rank update to a frozen weight, and every runtime must apply the same one."


def diffusers_class(model_id: str) -> str | None:
    """The diffusers class a folder's config.json names (None: not a diffusers folder; a broken config.json
    is left to the transformers loader, which reports it in one line)."""
    config = Path(model_id) / "config.json"
    if not config.is_file():
        return None
    try:
        found = read_json(config)
    except LorakitError:
        return None
    name = found.get("_class_name") if isinstance(found, dict) else None
    return name if isinstance(name, str) else None


def _load_diffusers(model_id: str, cls: str) -> nn.Module:
    """A diffusers model from safetensors only (never a pickle), its loader's failures as one line."""
    import diffusers

    if not cls.isidentifier() or cls.startswith("_") or not hasattr(diffusers, cls):
        raise LorakitError(f"{model_id} is a diffusers {cls}, which this diffusers version does not have")
    logs = diffusers.utils.logging
    before = logs.get_verbosity()
    logs.set_verbosity(logs.CRITICAL)  # it logs an error before raising one: the one line below says it
    try:
        model = getattr(diffusers, cls).from_pretrained(model_id, use_safetensors=True)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001  (OSError, ValueError, EnvironmentError, ... for one broken folder)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LorakitError(f"could not load diffusers model {model_id}: {first}; check the model folder") from None
    finally:
        logs.set_verbosity(before)
    return model.float().eval()


def load_base(model_id: str, adapter: str) -> tuple[nn.Module, Any, str]:
    """(base model in eval mode, tokenizer or None, task: causal-lm | seq-cls | diffusers)."""
    cls = diffusers_class(model_id)
    if cls is not None:
        return _load_diffusers(model_id, cls), None, "diffusers"
    from ..formats.detect import detect
    from ..models import load_model, load_tokenizer
    from .common import adapter_info

    info = adapter_info(adapter) if detect(adapter) == "peft" else {"task": "causal-lm"}
    labels = info.get("labels") if info["task"] == "seq-cls" else None
    extra = {"num_labels": len(labels), "ignore_mismatched_sizes": True} if labels else {}
    tokenizer = load_tokenizer(model_id)
    return load_model(model_id, task=info["task"], **extra), tokenizer, info["task"]


def attach(model: nn.Module, adapter: str, strict: bool = False, name: str = "default") -> nn.Module:
    """Load `adapter` onto `model`; a base-fingerprint mismatch is one "warning:" line on stderr."""
    import sys
    import warnings

    from ..fingerprint import BaseMismatchWarning
    from ..formats.detect import load

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BaseMismatchWarning)
        load(model, adapter, name=name, strict=strict)
    for warning in caught:
        if issubclass(warning.category, BaseMismatchWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return model.eval()


def probe(model: nn.Module, tokenizer: Any, task: str) -> dict[str, Any]:
    """A fixed input for `model`: token ids for language models, seeded latents for diffusers models."""
    if task != "diffusers":
        return dict(tokenizer(PROBE_TEXT, return_tensors="pt"))
    g = torch.Generator().manual_seed(0)
    config = model.config
    channels, size = config.in_channels, config.sample_size if isinstance(config.sample_size, int) else 8
    inputs: dict[str, Any] = {"sample": torch.randn(1, channels, size, size, generator=g), "timestep": 10}
    context = getattr(config, "cross_attention_dim", None)
    if context:
        inputs["encoder_hidden_states"] = torch.randn(1, 4, context, generator=g)
    return inputs


def output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's output tensor (logits, or the predicted noise of a diffusion model)."""
    with torch.no_grad():
        out = model(**inputs)
    for key in ("logits", "sample"):
        if hasattr(out, key):
            return getattr(out, key).float()
    return (out[0] if isinstance(out, tuple) else out).float()


def fresh(base: nn.Module) -> nn.Module:
    return copy.deepcopy(base)
