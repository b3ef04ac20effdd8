"""PEFT's adapter format, read and written: adapter_config.json + adapter_model.safetensors.

Tensor keys are `base_model.model.<module path>.` followed by
    lora_A.weight (r x k, or r x c_in x kernel)  lora_B.weight (d x r, or d x r x 1...)
    lora_embedding_A (r x V)  lora_embedding_B (d x r)      for embeddings
    lora_magnitude_vector (d)                                 for DoRA
    lora_A.weight (E·r x k), lora_B.weight (d x r·E)          for an expert parameter (layers/experts.py),
                                                              at <module path>[.base_layer...]
    <param> / base_layer.bias                                 for modules_to_save and biases
Reading is in peft_read.py (strict, through the one attach path); this module writes.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..adapters import canonical, owned_biases
from ..config import alpha_for_scale
from ..errors import LorakitError
from ..io import write_json, write_safetensors
from ..layers import Embedding, LoraWrapper, is_gpt2_conv1d
from ..model_state import adapter_configs, lora_layers, require_adapter, saved_modules, walk

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": True}  # PiSSA is saved converted to plain LoRA


def _factors(layer: LoraWrapper, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A and B as stored on disk. A PiSSA adapter is saved relative to the original W0:
    ΔW = s·(B·A - B0·A0) = s·[B, -B0]·[A; A0], a plain LoRA of rank 2r."""
    a, b, r = layer.lora_A[name].detach(), layer.lora_B[name].detach(), layer.specs[name].r
    if name in layer._pissa_start:
        a0, b0 = layer._pissa_start[name]
        return torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1), 2 * r
    return a, b, r


def _target_names(model: nn.Module, paths: list[str]) -> list[str] | str:
    """target_modules that make PEFT adapt exactly `paths`.

    PEFT adapts every module whose name equals an entry or ends with "." + entry, containers included, so
    each path is written as its shortest dotted suffix that picks no other module: the leaf name (q_proj)
    where it is unique to adapted modules, longer where the leaf is ambiguous (attn1.to_out.0, not "0",
    which would also pick down_blocks.0). A path that is itself the tail of a longer one gets an anchored regex.
    """
    adapted = set(paths)
    picked_by: dict[str, set[str]] = {}  # dotted suffix -> every module name it picks
    for name, _ in walk(model):
        parts = name.split(".")
        for i in range(len(parts)):
            picked_by.setdefault(".".join(parts[i:]), set()).add(name)
    names = set()
    for path in paths:
        parts = path.split(".")
        suffix = next(
            (s for s in (".".join(parts[-k:]) for k in range(1, len(parts) + 1)) if picked_by[s] <= adapted), None
        )
        if suffix is None:
            return "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"
        names.add(suffix)
    return sorted(names)


def hub_id(model: nn.Module) -> str | None:
    """The model's hub id ("org/name") when it has one, for base_model_name_or_path; None for a local folder.

    Runtimes (llama.cpp's converter, vLLM) take this field for a hub id, so a local path would mislead them.
    A folder inside the Hugging Face cache (models--org--name/snapshots/...) gives its id back, and so does
    lorakit's converted SmolLM2.
    """
    from ..models import SMOLLM2, SMOLLM2_HUB_ID, cache_dir

    name = str(getattr(getattr(model, "config", None), "_name_or_path", None) or "")
    if not name:
        return None
    if name.lower() in (SMOLLM2, "smollm2"):
        return SMOLLM2_HUB_ID
    path = Path(name).expanduser()
    if path.exists():
        cached = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", str(path.resolve()))
        if cached:
            return f"{cached[1]}/{cached[2]}"
        if path.resolve() == (cache_dir() / "SmolLM2-135M-Instruct").resolve():
            return SMOLLM2_HUB_ID
        return None
    return name if re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name) else None


def _task_type(model: nn.Module, has_head: bool) -> str | None:
    """PEFT's task_type for the model's class. A classification task type makes PEFT expect the trained
    head in the file, so an adapter that saves no head gets none (PEFT's plain PeftModel loads it)."""
    cls = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
    ):
        if cls.endswith(suffix):
            return task if task == "CAUSAL_LM" or has_head else None
    return None


def adapter_state(model: nn.Module, name: str, pure: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and adapter_config.json contents for adapter `name`."""
    require_adapter(model, name)
    config = adapter_configs(model)[name]
    if pure and (config.use_dora or config.modules_to_save or config.bias != "none"):
        raise LorakitError(
            f"adapter '{name}' has DoRA magnitudes, modules_to_save or biases, which a pure adapter cannot hold; save "
            "it without pure=True"
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, modules, parameters = {}, {}, [], []
    for path, layer in lora_layers(model):
        if name not in layer.specs:
            continue
        a, b, _ = _factors(layer, name)
        kind = (
            ("lora_embedding_A", "lora_embedding_B")
            if isinstance(layer, Embedding)
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{path}.{kind[0]}"] = a
        tensors[f"{PREFIX}{path}.{kind[1]}"] = b
        if name in layer.lora_magnitude:
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude[name].detach()
        key = layer.target_key(path)  # a parameter's patterns use "<module>.<parameter>", as in PEFT
        (parameters if layer.parameter_name else modules).append(key)
        ranks[key] = layer.rank_of(a)
        alphas[key] = alpha_for_scale(layer.specs[name].scale, ranks[key], config.use_rslora)  # same s at that rank
    if not pure:
        for path, holder in saved_modules(model):
            if name in holder.copies:
                tensors.update({f"{PREFIX}{path}.{k}": v for k, v in holder.copies[name].state_dict().items()})
        owned = owned_biases(model, config, set(modules))
        for param_name, param in model.named_parameters():
            if canonical(param_name) in owned:
                tensors[PREFIX + param_name] = param.detach()
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(alphas.values()).most_common(1)[0][0]
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model, has_head=not pure and bool(config.modules_to_save)),
        "base_model_name_or_path": hub_id(model),
        "r": r_default,
        "lora_alpha": alpha_default,
        "lora_dropout": config.dropout,
        "target_modules": _target_names(model, modules) if modules else [],
        "rank_pattern": {p: r for p, r in ranks.items() if r != r_default},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha_default},
        "bias": "none" if pure else config.bias,
        "modules_to_save": None if pure else config.modules_to_save,
        "init_lora_weights": _INIT_TO_PEFT[config.init],
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": any(is_gpt2_conv1d(layer.base_layer) for p, layer in lora_layers(model) if p in ranks),
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if parameters:  # only then: PEFT versions before target_parameters would refuse the unknown field
        peft_config["target_parameters"] = sorted(parameters)
    return tensors, peft_config


SAVE_FORMATS = ("peft", "diffusers", "kohya")


def require_modules_only(model: nn.Module, name: str, target: str) -> None:
    """Expert stacks (target_parameters) exist only in PEFT's own layout: every converted format reads a factor
    pair as one d x k matrix, not E of them (layers/experts.py), so such an adapter is refused there."""
    require_adapter(model, name)
    if adapter_configs(model)[name].target_parameters:
        raise LorakitError(
            f"adapter '{name}' adapts expert parameters (target_parameters), which {target} cannot hold (one LoRA "
            "pair per matrix, not one per expert); save it in PEFT's format without fold_scales, or merge it"
        )


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    name: str = "default",
    pure: bool = False,
    format: str = "peft",
    fold_scales: bool = False,
    prefix: str | None = None,
) -> Path:
    """Write adapter `name`; returns the path written.

    format="peft" (default): adapter_config.json + adapter_model.safetensors in `directory`; pure=True
        writes only LoRA factors (vLLM, llama.cpp).
    format="diffusers": `directory`/pytorch_lora_weights.safetensors, config in its header, keys under the
        pipeline component `prefix` (default: unet / transformer / text_encoder from the model's class);
        loads with a pipeline's load_lora_weights(directory) or model.load_lora_adapter(directory, prefix=...).
    format="kohya": one kohya / A1111 file; `directory` is the .safetensors path (prefix: lora_unet_ ...).
    fold_scales=True folds every module's scale into B (one rank, alpha = r) so runtimes that read only
        lora_alpha (vLLM, llama.cpp's converter) compute the same update under rsLoRA and alpha/rank patterns.
    The base fingerprint (lorakit.fingerprint) goes into the safetensors header.
    """
    from .. import fingerprint
    from . import fold

    if format not in SAVE_FORMATS:
        raise LorakitError(f"format={format!r} is not a format lorakit writes; use one of {', '.join(SAVE_FORMATS)}")
    if format != "peft" or fold_scales:
        require_modules_only(model, name, f"format={format!r}" if format != "peft" else "fold_scales")
    tensors, peft_config = adapter_state(model, name, pure=pure)
    if fold_scales:
        peft_config, tensors = fold.fold_scales(peft_config, tensors)
    paths = [p for p, layer in lora_layers(model) if name in layer.specs]
    metadata = {"format": "pt", **fingerprint.to_metadata(fingerprint.record(model, paths))}
    directory = Path(directory)
    if format == "kohya":
        from .diffusers import legacy_prefix
        from .kohya import kohya_prefix, to_kohya

        if directory.suffix != ".safetensors" or directory.is_dir():
            raise LorakitError(f"{directory}: a kohya LoRA is one file; give a path ending in .safetensors")
        out, extra = to_kohya(peft_config, tensors, kohya_prefix(model, prefix), legacy_prefix(model))
        write_safetensors(directory, out, metadata={**metadata, **extra})
        return directory
    if directory.exists() and not directory.is_dir():
        raise LorakitError(f"{directory} exists and is not a directory; choose another output path")
    if format == "diffusers":
        from .diffusers import WEIGHTS_FILE as DIFFUSERS_FILE
        from .diffusers import component_of, legacy_prefix, to_diffusers

        out, extra = to_diffusers(peft_config, tensors, prefix or component_of(model), legacy_prefix(model))
        write_safetensors(directory / DIFFUSERS_FILE, out, metadata={**metadata, **extra})
        return directory
    write_safetensors(directory / WEIGHTS_FILE, tensors, metadata=metadata)
    write_json(directory / CONFIG_FILE, peft_config)
    return directory
