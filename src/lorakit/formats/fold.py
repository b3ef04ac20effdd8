"""Per-module scales of an adapter in PEFT's layout, and folding them into B for runtimes that read one alpha.

PEFT computes each module's update as ΔW = s·B·A with
    s = alpha_m / r_m             (alpha_m from alpha_pattern, else lora_alpha; r_m = A's rows)
    s = alpha_m / sqrt(r_m)       with use_rslora.
vLLM reads only lora_alpha and r (s = lora_alpha / r for every module: no alpha_pattern, no rank_pattern),
and llama.cpp's GGUF adapters carry one alpha (s = alpha / r_m per tensor). `fold_scales` rewrites an
adapter so all of them compute the same ΔW: B ← s_m·B in every module, ranks padded with zero rows and
columns to the largest rank (zeros add nothing to B·A), and the config says r = lora_alpha = that rank,
no patterns, no rsLoRA, so every reader's scale is exactly 1.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from ..config import LoraConfig
from ..errors import LorakitError
from .peft import PREFIX

_FACTOR = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def factor_keys(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """module path -> {"A": key, "B": key} for every LoRA pair in a PEFT-layout state dict."""
    pairs: dict[str, dict[str, str]] = {}
    for key in tensors:
        found = _FACTOR.match(key.removeprefix(PREFIX))
        if found:
            pairs.setdefault(found["path"], {})[found["kind"].removesuffix(".weight")[-1]] = key
    return pairs


def scale_rule(peft_config: dict) -> LoraConfig:
    """The config's scale rule (alpha, patterns, rsLoRA) as a LoraConfig, whose alpha_for is PEFT's lookup."""
    try:
        return LoraConfig(
            r=int(peft_config.get("r") or 8),
            alpha=float(peft_config.get("lora_alpha") or 8),
            rank_pattern=dict(peft_config.get("rank_pattern") or {}),
            alpha_pattern=dict(peft_config.get("alpha_pattern") or {}),
            use_rslora=bool(peft_config.get("use_rslora", False)),
        )
    except (TypeError, ValueError) as err:
        raise LorakitError(f"adapter config has an invalid scale setting: {err}") from None


def module_scales(peft_config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """module path -> (rank, scale s) exactly as PEFT (and lorakit) apply them."""
    rule = scale_rule(peft_config)
    out = {}
    for path, keys in factor_keys(tensors).items():
        if "A" not in keys or "B" not in keys:
            raise LorakitError(
                f"adapter for '{path}' lacks lora_{'A' if 'A' not in keys else 'B'}; the file is incomplete"
            )
        r = int(tensors[keys["A"]].shape[0])
        alpha = rule.alpha_for(path)
        out[path] = (r, alpha / r**0.5 if rule.use_rslora else alpha / r)
    return out


def one_alpha(scales: dict[str, tuple[int, float]]) -> tuple[float, dict[str, float]]:
    """For formats that store ΔW = (alpha / r_m)·B·A with r_m each module's own rank (kohya, llama.cpp's GGUF):
    the most common alpha_m = s_m·r_m, and per module the factor its B needs so the update stays s_m·B·A."""
    alpha = Counter(s * r for r, s in scales.values()).most_common(1)[0][0]
    return alpha, {path: s * r / alpha for path, (r, s) in scales.items()}


def _pad(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] == size:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def fold_scales(peft_config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The same adapter with every module's scale folded into B and one rank: scale 1 for every runtime."""
    scales = module_scales(peft_config, tensors)
    if not scales:
        raise LorakitError("the adapter holds no LoRA factors to fold")
    rank = max(r for r, _ in scales.values())
    folded = dict(tensors)
    for path, keys in factor_keys(tensors).items():
        r, s = scales[path]
        a, b = tensors[keys["A"]], tensors[keys["B"]]
        folded[keys["A"]] = _pad(a, 0, rank)  # A is (r x k ...), B is (d x r ...) for every layer kind
        folded[keys["B"]] = _pad((b.double() * s).to(b.dtype), 1, rank)
    config = dict(peft_config)
    config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    return config, folded
