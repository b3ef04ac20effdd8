"""Base fingerprint: which base weights an adapter was trained on, recorded cheaply and checked on load.

For each adapted module the fingerprint holds its weight's shape (d x k) and a 16-hex-digit hash of
SAMPLE values taken at evenly spaced positions of the flattened weight, rounded to bf16 first, so a
base stored in fp32 or bf16 gives the same fingerprint while a fine-tuned, re-initialised or other
model does not. The weight is the ORIGINAL base: a merged adapter is taken back out and a PiSSA
adapter's top-r part added back, so the fingerprint does not depend on what is attached.

    record(model, paths)  -> {"version": 1, "sample": 32, "modules": {path: [d, k, hash]}}
    compare(model, fp)    -> list of differences (module missing, shape, values)
    check(model, fp, strict) warns (BaseMismatchWarning) or, with strict=True, raises LorakitError, when the
                             values differ (a missing module or another shape is the attach path's error)

The fingerprint travels in the adapter file's safetensors header under METADATA_KEY (JSON), which
PEFT, diffusers, vLLM and llama.cpp ignore.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import torch
from torch import Tensor, nn

from .errors import LorakitError
from .layers import ExpertParameter, LoraWrapper, innermost, is_adaptable, parameter_layers, wrap

METADATA_KEY = "lorakit_base_fingerprint"
VERSION = 1
SAMPLE = 32
VALUES_DIFFER = "different weight values"


class BaseMismatchWarning(UserWarning):
    """An adapter is being loaded onto base weights other than the ones it was trained on."""


def original_weight(module: nn.Module) -> Tensor:
    """The (d x k) base weight as it was before any adapter touched it."""
    layer = module if isinstance(module, LoraWrapper) else wrap(module)  # a throwaway view, the model is untouched
    weight = layer.weight_2d().detach().float()
    if layer.merged is not None:
        delta = layer.delta_weight(layer.merged).detach().float()
        factor = layer._dora_factor
        weight = (weight / factor[:, None].float() if factor is not None else weight) - delta
    for name, (a0, b0) in layer._pissa_start.items():
        weight = weight + layer.specs[name].scale * (b0.reshape(weight.shape[0], -1) @ a0.reshape(a0.shape[0], -1))
    return weight


def _adapted(model: nn.Module, key: str) -> nn.Module | None:
    """The module a fingerprint key names, or for "<module path>.<parameter>" that parameter's layer
    (a throwaway view when the model has none yet); None when the model has neither."""
    try:
        return model.get_submodule(key)
    except AttributeError:
        pass
    owner_path, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(owner_path)
    except AttributeError:
        return None
    found = parameter_layers(module).get(name)
    param = innermost(module)._parameters.get(name)
    if found is None and (param is None or param.dim() not in (2, 3)):
        return None
    return found or ExpertParameter(innermost(module), name)


def module_hash(weight: Tensor, sample: int = SAMPLE) -> str:
    flat = weight.reshape(-1)
    positions = torch.linspace(0, flat.numel() - 1, steps=min(sample, flat.numel())).round().long()
    values = flat[positions].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
    shape = ",".join(str(s) for s in weight.shape).encode()
    return hashlib.sha256(shape + b"|" + values).hexdigest()[:16]


def record(model: nn.Module, paths: list[str]) -> dict:
    """The fingerprint of the modules at `paths` (the adapted ones)."""
    modules = {}
    for path in sorted(paths):
        module = model.get_submodule(path)
        weight = original_weight(module)
        key = module.target_key(path) if isinstance(module, LoraWrapper) else path  # a parameter: "<module>.<name>"
        modules[key] = [*weight.shape, module_hash(weight)]
    return {"version": VERSION, "sample": SAMPLE, "modules": modules}


def to_metadata(fingerprint: dict) -> dict[str, str]:
    return {METADATA_KEY: json.dumps(fingerprint, separators=(",", ":"), sort_keys=True)}


def from_metadata(metadata: dict[str, str] | None) -> dict | None:
    """The recorded fingerprint, or None when the file has none (written by another tool) or it is unreadable."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        fingerprint = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(fingerprint, dict) or fingerprint.get("version") != VERSION:
        return None
    return fingerprint if isinstance(fingerprint.get("modules"), dict) else None


def compare(model: nn.Module, fingerprint: dict) -> list[str]:
    """One line per module whose base differs from the recorded one (empty: the same base)."""
    differences = []
    sample = int(fingerprint.get("sample", SAMPLE))
    for path, entry in sorted(fingerprint["modules"].items()):
        module = _adapted(model, path)
        if module is None:
            differences.append(f"{path}: not in this model")
            continue
        base = module.base_layer if isinstance(module, LoraWrapper) else module
        if getattr(module, "parameter_name", None) is None and not is_adaptable(base):
            differences.append(f"{path}: a {type(base).__name__} here, not the adapted layer")
            continue
        weight = original_weight(module)
        *shape, digest = entry
        if list(weight.shape) != list(shape):
            differences.append(f"{path}: shape {tuple(weight.shape)}, trained on {tuple(shape)}")
        elif module_hash(weight, sample) != digest:
            differences.append(f"{path}: {VALUES_DIFFER}")
    return differences


def check(model: nn.Module, fingerprint: dict | None, strict: bool = False, source: str = "the adapter") -> list[str]:
    """Warn (or raise with strict=True) when `model` is not the base `fingerprint` was recorded on."""
    if fingerprint is None:
        return []
    differences = compare(model, fingerprint)
    if any(not d.endswith(VALUES_DIFFER) for d in differences):
        return differences  # a module missing or of another shape: the attach path refuses it, naming the tensor
    if differences:
        total = len(fingerprint["modules"])
        message = (
            f"{source} was trained on other base weights: {len(differences)} of {total} adapted modules differ "
            f"(first: {differences[0]}); its outputs on this model are not the ones it was trained for"
        )
        if strict:
            raise LorakitError(message + "; load the base model it was trained on, or drop strict")
        warnings.warn(message, BaseMismatchWarning, stacklevel=3)
    return differences
