"""diffusers' LoRA format, both ways: one `pytorch_lora_weights.safetensors`, the config in its header.

What a pipeline's `save_lora_weights` writes (and `load_lora_weights` / a model's `load_lora_adapter` read):

    <component>.<module path>.lora_A.weight / lora_B.weight [/ lora_magnitude_vector]
    header "lora_adapter_metadata": JSON {"<component>.r": 4, "<component>.lora_alpha": 8, ...}

with <component> the pipeline part the module belongs to: unet, transformer, text_encoder, text_encoder_2.
A model's own `save_lora_adapter` writes the same without the component prefix. Without metadata diffusers
applies every module at scale 1 (alpha = r); older files spell the factors `.lora.down/.up`,
`.lora_linear_layer.down/.up` or `.processor.to_q_lora.down/.up`, which the reader maps too.

Both directions go through PEFT's layout (formats/peft.py): `to_diffusers` takes its config and tensors,
`read_diffusers` returns them, so a diffusers file loads through the same checked path as any adapter.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..errors import LorakitError
from .fold import PREFIX, factor_keys, module_scales
from .safetensors_file import read_with_metadata

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
_LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
_OLD_NAMES = [  # older diffusers spellings -> PEFT's (module path first, then the factor)
    (re.compile(r"\.processor\.(to_q|to_k|to_v)_lora\.(down|up)\.weight$"), r".\1.lora_\2.weight"),
    (re.compile(r"\.processor\.to_out_lora\.(down|up)\.weight$"), r".to_out.0.lora_\1.weight"),
    (re.compile(r"\.(?:lora|lora_linear_layer)\.(down|up)\.weight$"), r".lora_\1.weight"),
]
_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "peft_type")  # replaced by
# the exact list of modules the file has factors for
_CONFIG_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_dropout")


def component_of(model: nn.Module) -> str:
    """The pipeline component a model is: unet, transformer (a diffusers transformer) or text_encoder."""
    cls, module = type(model).__name__, type(model).__module__
    if module.startswith("diffusers"):
        if "UNet" in cls:
            return "unet"
        if "Transformer" in cls:
            return "transformer"
    if module.startswith("transformers"):
        return "text_encoder"
    raise LorakitError(
        f"cannot tell which pipeline component a {cls} is; pass prefix= (one of {', '.join(COMPONENTS)})"
    )


def legacy_prefix(model: nn.Module) -> str:
    """ "text_model." for a CLIP text encoder that lacks it: transformers 5 flattened CLIPTextModel, while LoRA
    files (and older runtimes) name its modules text_model.encoder...; diffusers strips it when absent."""
    return "text_model." if type(model).__name__.startswith("CLIPText") and not hasattr(model, "text_model") else ""


def to_diffusers(
    peft_config: dict, tensors: dict[str, torch.Tensor], prefix: str, legacy: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT-layout adapter -> (tensors, header metadata) in diffusers' pipeline layout under `prefix`
    (`legacy` goes before every module path: see legacy_prefix)."""
    if prefix not in COMPONENTS:
        raise LorakitError(
            f"prefix={prefix!r} is not a diffusers pipeline component; use one of {', '.join(COMPONENTS)}"
        )
    out = {}
    for key, value in tensors.items():
        short = key.removeprefix(PREFIX)
        if not short.endswith(_LORA_SUFFIXES):
            raise LorakitError(
                f"adapter tensor '{short}' is not a LoRA factor (modules_to_save or a bias); diffusers' format holds "
                "LoRA factors only: save with format='peft', or train without modules_to_save / bias"
            )
        out[f"{prefix}.{legacy}{short}"] = value
    module_scales(peft_config, tensors)  # refuses an incomplete adapter before anything is written
    config = {k: peft_config[k] for k in _CONFIG_FIELDS if k in peft_config}
    config["target_modules"] = sorted(factor_keys(tensors))  # full paths: exactly the adapted modules
    config.update(bias="none", init_lora_weights=True)
    metadata = {METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True)}
    return out, metadata


def weights_file(path: str | Path) -> Path:
    """`path` itself when it is a file, else the one LoRA safetensors file in the folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise LorakitError(f"{path} does not exist; give a diffusers LoRA folder or .safetensors file")
    if (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise LorakitError(
            f"{path} holds {len(files)} .safetensors files and no {WEIGHTS_FILE}; give the file's path instead"
        )
    return files[0]


def _peft_key(key: str) -> str:
    for pattern, replacement in _OLD_NAMES:
        key = pattern.sub(replacement, key)
    return key.replace("lora_down.", "lora_A.").replace("lora_up.", "lora_B.")


def _pick_prefix(keys: list[str], prefix: str | None) -> str | None:
    present = sorted({k.split(".", 1)[0] for k in keys if k.split(".", 1)[0] in COMPONENTS})
    if prefix is not None:
        if prefix not in present:
            raise LorakitError(
                f"the file holds no '{prefix}.' tensors (it has: {', '.join(present) or 'unprefixed keys'}); "
                "pick one of those"
            )
        return prefix
    if len(present) > 1:
        raise LorakitError(
            f"the file holds LoRAs for several pipeline components ({', '.join(present)}); pass prefix= for the "
            "one this model is"
        )
    return present[0] if present else None


def read_diffusers(
    path: str | Path, prefix: str | None = None, model: nn.Module | None = None
) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """A diffusers LoRA file -> (PEFT config dict, PEFT-layout tensors, header metadata).

    prefix picks the pipeline component (default: the model's kind when the file holds several, or the
    only one there is)."""
    file = weights_file(path)
    tensors, header = read_with_metadata(file)
    if prefix is None and model is not None:
        present = {k.split(".", 1)[0] for k in tensors} & set(COMPONENTS)
        prefix = component_of(model) if len(present) > 1 else None
    prefix = _pick_prefix(list(tensors), prefix)
    raw = json.loads(header[METADATA_KEY]) if header.get(METADATA_KEY) else None
    metadata = {k.removeprefix(f"{prefix}."): v for k, v in (raw or {}).items() if not prefix or k.startswith(prefix)}
    alphas: dict[str, float] = {}
    out: dict[str, torch.Tensor] = {}
    legacy = legacy_prefix(model) if model is not None else ""  # text_model. in the file, not in the model
    for key, value in tensors.items():
        if prefix:
            if not key.startswith(prefix + "."):
                continue
            key = key[len(prefix) + 1 :]
        if key.endswith(".alpha"):  # network alphas (kohya-trained files converted by diffusers)
            alphas[key.removesuffix(".alpha").removeprefix(legacy)] = float(value.float().reshape(-1)[0])
            continue
        key = _peft_key(key).removeprefix(legacy)
        if not key.endswith(_LORA_SUFFIXES):
            raise LorakitError(f"tensor '{key}' in {file} is not a LoRA factor diffusers writes; is it a LoRA file?")
        out[PREFIX + key] = value
    if not out:
        raise LorakitError(f"{file} holds no LoRA tensors{f' for {prefix}' if prefix else ''}")
    return _config(out, metadata, alphas), out, header


def _config(tensors: dict[str, torch.Tensor], metadata: dict, alphas: dict[str, float]) -> dict:
    """The PEFT config: the file's own where it has one, else diffusers' rule (alpha = network alpha or r)."""
    pairs = factor_keys(tensors)
    ranks = {p: int(tensors[k["B"]].shape[1]) for p, k in pairs.items() if "B" in k}
    module_alpha = {p: alphas.get(p, float(r)) for p, r in ranks.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": Counter(module_alpha.values()).most_common(1)[0][0],
        "use_dora": any(k.endswith("lora_magnitude_vector") for k in tensors),
    }
    config["rank_pattern"] = {f"^{p}": v for p, v in ranks.items() if v != r}
    config["alpha_pattern"] = {f"^{p}": a for p, a in module_alpha.items() if a != config["lora_alpha"]}
    config.update({k: v for k, v in metadata.items() if k not in _TARGETING})
    config["target_modules"] = sorted(pairs)
    return config
