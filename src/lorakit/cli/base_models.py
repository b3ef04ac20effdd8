"""What `lorakit export` and `lorakit verify` share: a base model of any kind, and an adapter in any format on it.

A folder whose config.json names a diffusers class (_class_name, e.g. UNet2DConditionModel) loads with
diffusers; anything else is a transformers model (task from the adapter's run.json / adapter_config.json).
The adapter may be a PEFT folder, a diffusers LoRA or a kohya file (formats/detect.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError

PROBE_TEXT = "LoRA adds a low-rank update to a frozen weight, and every runtime must apply the same one."


def diffusers_class(model_id: str) -> str | None:
    config = Path(model_id) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def load_base(model_id: str, adapter: str) -> tuple[nn.Module, Any, str]:
    """(base model in eval mode, tokenizer or None, task: causal-lm | seq-cls | diffusers)."""
    cls = diffusers_class(model_id)
    if cls is not None:
        import diffusers

        if not hasattr(diffusers, cls):
            raise LorakitError(f"{model_id} is a diffusers {cls}, which this diffusers version does not have")
        return getattr(diffusers, cls).from_pretrained(model_id).float().eval(), None, "diffusers"
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
