"""The kohya / A1111 LoRA format (what most Stable Diffusion LoRAs in the wild are), both ways.

One .safetensors file; per adapted module, named by its path with "." turned into "_" behind the
component's prefix (lora_unet_ for the UNet, lora_te_ / lora_te1_ / lora_te2_ for text encoders):

    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight   A (r x k), or (r x c_in x kh x kw)
    lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight     B (d x r), or (d x r x 1 x 1)
    lora_unet_down_blocks_0_attentions_0_proj_in.alpha              0-d tensor; ΔW = (alpha / r)·B·A

kohya has no rsLoRA and no DoRA: the writer stores one alpha for all modules and folds whatever else a
module's scale needs into its lora_up, so every module's update is exact in every kohya reader.
Because "_" also appears inside module names
(transformer_blocks, to_out), a name maps back to a path only against the model, which `read_kohya` takes.
Both directions go through PEFT's layout (formats/peft.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..errors import LorakitError
from ..layers import is_adaptable
from ..model_state import walk
from .diffusers import component_of, legacy_prefix
from .fold import PREFIX, factor_keys, module_scales, one_alpha
from .safetensors_file import read_with_metadata

COMPONENT_PREFIX = {"unet": "lora_unet_", "transformer": "lora_unet_", "text_encoder": "lora_te_"}
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}


def kohya_prefix(model: nn.Module, prefix: str | None = None) -> str:
    if prefix is not None:
        if not (prefix.startswith("lora_") and prefix.endswith("_")):
            raise LorakitError(
                f"prefix={prefix!r} is not a kohya prefix; use lora_unet_, lora_te_, lora_te1_ or lora_te2_"
            )
        return prefix
    return COMPONENT_PREFIX[component_of(model)]


def kohya_name(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def to_kohya(
    peft_config: dict, tensors: dict[str, torch.Tensor], prefix: str, legacy: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT-layout adapter -> (tensors, header metadata) in kohya's layout under `prefix`; `legacy` is put
    before every path (text_model. for CLIP text encoders, see diffusers.legacy_prefix)."""
    pairs = factor_keys(tensors)
    for key in tensors:
        short = key.removeprefix(PREFIX)
        if not short.endswith(("lora_A.weight", "lora_B.weight")):
            what = (
                "a DoRA magnitude"
                if "magnitude" in short
                else "an embedding LoRA"
                if "embedding" in short
                else "a saved module or bias"
            )
            raise LorakitError(
                f"adapter tensor '{short}' is {what}, which kohya's format cannot hold; save with format='peft' "
                "(or export a merged model)"
            )
    scales = module_scales(peft_config, tensors)
    # One alpha for every module, the rest of each module's scale folded into lora_up: diffusers' kohya
    # converter drops per-module alphas of attention layers, and A1111 / ComfyUI read per-module ones.
    alpha, factors = one_alpha(scales)
    out: dict[str, torch.Tensor] = {}
    for path in sorted(scales):
        name = kohya_name(prefix, legacy + path)
        up = tensors[pairs[path]["B"]]
        out[f"{name}.lora_down.weight"] = tensors[pairs[path]["A"]]
        out[f"{name}.lora_up.weight"] = up if factors[path] == 1 else (up.double() * factors[path]).to(up.dtype)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    ranks = [r for r, _ in scales.values()]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(Counter(ranks).most_common(1)[0][0]),
        "ss_network_alpha": f"{alpha:g}",
    }
    return out, metadata


def _names(model: nn.Module, prefix: str) -> dict[str, str]:
    """kohya name -> module path for every adaptable module of `model` (also under text_model. for CLIP)."""
    from ..layers import LoraWrapper

    legacy = legacy_prefix(model)
    names = {}
    for path, module in walk(model):
        if is_adaptable(module.base_layer if isinstance(module, LoraWrapper) else module):
            names[kohya_name(prefix, path)] = path
            if legacy:
                names[kohya_name(prefix, legacy + path)] = path
    return names


def read_kohya(
    path: str | Path, model: nn.Module, prefix: str | None = None
) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """A kohya file -> (PEFT config dict, PEFT-layout tensors, header metadata) for `model`.

    Only the modules under the model's prefix are read (a file with UNet and text-encoder LoRAs is loaded
    into each model separately); a name under that prefix that the model lacks is refused."""
    tensors, header = read_with_metadata(path)
    if any(k.endswith((".dora_scale", ".lora_mid.weight")) or ".hada_" in k or ".lokr_" in k for k in tensors):
        raise LorakitError(f"{path} holds DoRA, LoCon-mid, LoHa or LoKr tensors; lorakit reads plain LoRA only")
    present = sorted({k.split(".", 1)[0] for k in tensors if k.startswith("lora_")})
    if not present:
        raise LorakitError(f"{path} has no lora_unet_* / lora_te_* tensors; it is not a kohya / A1111 LoRA file")
    if prefix is None:
        wanted = kohya_prefix(model)
        candidates = TEXT_PREFIXES if wanted == "lora_te_" else (wanted,)
        used = [p for p in candidates if any(n.startswith(p) for n in present)]
        if len(used) > 1:
            raise LorakitError(f"{path} holds LoRAs for text encoders {', '.join(used)}; pass prefix= for this one")
        prefix = used[0] if used else wanted
    names = _names(model, prefix)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, suffix = key.split(".", 1)[0], "." + key.split(".", 1)[1] if "." in key else ""
        if not name.startswith(prefix):
            continue
        if suffix not in _SUFFIXES:
            raise LorakitError(f"tensor '{key}' in {path} is not one of .lora_down.weight, .lora_up.weight, .alpha")
        if name not in names:
            raise LorakitError(
                f"tensor '{key}' names module '{name}', which this {type(model).__name__} does not have; the LoRA "
                "is for another model (SDXL files in the original-checkpoint layout are not supported)"
            )
        parts.setdefault(names[name], {})[_SUFFIXES[suffix]] = value
    if not parts:
        raise LorakitError(f"{path} holds no '{prefix}' tensors for this model (it has: {', '.join(present[:3])} ...)")
    out, ranks, alphas = {}, {}, {}
    for module_path, found in parts.items():
        for kind in ("A", "B"):
            if kind not in found:
                missing = "lora_down" if kind == "A" else "lora_up"
                raise LorakitError(f"{path}: module {kohya_name(prefix, module_path)} lacks its {missing} weight")
            out[f"{PREFIX}{module_path}.lora_{kind}.weight"] = found[kind]
        ranks[module_path] = int(found["A"].shape[0])
        # no alpha means scale 1 (alpha = r), as kohya's and diffusers' loaders read it
        alphas[module_path] = (
            float(found["alpha"].float().reshape(-1)[0]) if "alpha" in found else float(ranks[module_path])
        )
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(parts),
        "rank_pattern": {f"^{p}": v for p, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{p}": a for p, a in alphas.items() if a != alpha},
    }
    return config, out, header
