"""PEFT's adapter format, read and written: adapter_config.json + adapter_model.safetensors.

Tensor keys are `base_model.model.<module path>.` followed by
    lora_A.weight (r x k, or r x c_in x kernel)  lora_B.weight (d x r, or d x r x 1...)
    lora_embedding_A (r x V)  lora_embedding_B (d x r)      for embeddings
    lora_magnitude_vector (d)                                 for DoRA
    <param> / base_layer.bias                                 for modules_to_save and biases
Loading checks every tensor against the model before touching it, so a file for another model
is refused with the first mismatching tensor named and the model left as it was.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..adapters import is_shared_bias, set_adapter, set_trainable
from ..config import LoraConfig
from ..errors import LorakitError
from ..inject import base_of, check_target
from ..io import read_json, read_safetensors, write_json, write_safetensors
from ..layers import AdapterSpec, Embedding, LoraLayer, SavedModule, is_adaptable, is_gpt2_conv1d, wrap
from ..registry import (
    adapter_configs,
    check_adapter_name,
    lora_layers,
    require_adapter,
    saved_modules,
    set_submodule,
    walk,
)

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": True}  # PiSSA is saved converted to plain LoRA
_LORA_KEY = re.compile(
    r"^(?P<path>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.[A-Za-z_][\w\-]*)?(?:\.weight)?$"
)


def _alpha(scale: float, r: int, use_rslora: bool) -> float:
    alpha = scale * (r**0.5 if use_rslora else r)
    return float(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A and B as stored on disk. A PiSSA adapter is saved relative to the original W0:
    ΔW = s·(B·A - B0·A0) = s·[B, -B0]·[A; A0], a plain LoRA of rank 2r."""
    a, b, r = layer.lora_A[name].detach(), layer.lora_B[name].detach(), layer.specs[name].r
    if name in layer._pissa_start:
        a0, b0 = layer._pissa_start[name]
        return torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1), 2 * r
    return a, b, r


def _target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names (e.g. q_proj) when they pick exactly `paths`, else the full paths.

    Every module counts, not only adaptable ones: PEFT wraps whatever a name matches and refuses a
    container, so `to_out.0` must not be saved as "0" in a model that also has `down_blocks.0`."""
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    picked = {p for p, _ in walk(model) if p.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if picked == set(paths) else sorted(paths)


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
    ):
        if cls.endswith(suffix):
            return task
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
    ranks, alphas = {}, {}
    for path, layer in lora_layers(model):
        if name not in layer.specs:
            continue
        a, b, r = _factors(layer, name)
        kind = (
            ("lora_embedding_A", "lora_embedding_B")
            if isinstance(layer, Embedding)
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{path}.{kind[0]}"] = a
        tensors[f"{PREFIX}{path}.{kind[1]}"] = b
        if name in layer.lora_magnitude:
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude[name].detach()
        ranks[path] = r
        alphas[path] = _alpha(layer.specs[name].scale, r, config.use_rslora)  # same s at the saved rank
    if not pure:
        for path, holder in saved_modules(model):
            if name in holder.copies:
                tensors.update({f"{PREFIX}{path}.{k}": v for k, v in holder.copies[name].state_dict().items()})
        if config.bias != "none":
            lora_paths = set(ranks)
            for param_name, param in model.named_parameters():
                owner = param_name.rsplit(".", 2)[0] if ".base_layer." in param_name else None
                if is_shared_bias(param_name) and (config.bias == "all" or owner in lora_paths):
                    tensors[PREFIX + param_name] = param.detach()
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(alphas.values()).most_common(1)[0][0]
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r_default,
        "lora_alpha": alpha_default,
        "lora_dropout": config.dropout,
        "target_modules": _target_names(model, list(ranks)),
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
    return tensors, peft_config


def save_adapter(model: nn.Module, directory: str | Path, name: str = "default", pure: bool = False) -> Path:
    """Write adapter `name` in PEFT's layout. pure=True writes only LoRA factors (vLLM, llama.cpp)."""
    tensors, peft_config = adapter_state(model, name, pure=pure)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LorakitError(f"{directory} exists and is not a directory; choose another output path")
    write_safetensors(directory / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, peft_config)
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors, with clear errors for anything else."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LorakitError(f"adapter directory {directory} does not exist; give the folder holding {CONFIG_FILE}")
    if not (directory / WEIGHTS_FILE).is_file() and (directory / "adapter_model.bin").is_file():
        raise LorakitError(
            f"{directory} holds only adapter_model.bin; lorakit reads safetensors only (re-save with PEFT's "
            "safe_serialization=True)"
        )
    config = read_json(directory / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise LorakitError(
            f"{directory / CONFIG_FILE} is not a LoRA adapter config "
            f"(peft_type={config.get('peft_type') if isinstance(config, dict) else None!r})"
        )
    return config, read_safetensors(directory / WEIGHTS_FILE)


def config_from_peft(peft_config: dict) -> LoraConfig:
    init = peft_config.get("init_lora_weights", True)
    try:
        return LoraConfig(
            r=int(peft_config.get("r", 8)),
            alpha=float(peft_config.get("lora_alpha", 8)),
            dropout=float(peft_config.get("lora_dropout") or 0.0),
            target_modules=peft_config.get("target_modules"),
            rank_pattern=dict(peft_config.get("rank_pattern") or {}),
            alpha_pattern=dict(peft_config.get("alpha_pattern") or {}),
            bias=peft_config.get("bias", "none"),
            modules_to_save=peft_config.get("modules_to_save"),
            init="gaussian" if init == "gaussian" else "kaiming",
            use_rslora=bool(peft_config.get("use_rslora", False)),
            use_dora=bool(peft_config.get("use_dora", False)),
        )
    except (TypeError, ValueError) as err:
        raise LorakitError(f"adapter_config.json has an invalid value: {err}") from None


def _resolve(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    name: str = "default",
    trainable: bool = False,
    activate: bool = True,
    freeze: bool = True,
) -> nn.Module:
    """Add the adapter saved in `directory` (by lorakit or PEFT) as `name`; returns the model.

    The model ends up frozen, unless trainable=True, which makes this adapter the trainable part.
    activate=True makes it the adapter forward uses. freeze=False (with trainable=False) freezes
    only the new adapter's tensors and leaves the rest as it is: a server whose model is frozen
    once saves a walk over every parameter on each hot load.
    """
    check_adapter_name(name)
    if name in adapter_configs(model):
        raise LorakitError(f"adapter '{name}' already exists; delete it first or load under another name")
    peft_config, tensors = read_adapter(directory)
    config = config_from_peft(peft_config)
    saved_paths = set()
    for path, _ in walk(model) if config.modules_to_save else ():
        if re.fullmatch(r"|".join(rf"(.*\.)?{re.escape(m)}" for m in config.modules_to_save), path):
            saved_paths.add(path)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved_state: dict[str, dict[str, torch.Tensor]] = {}
    extras: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (key, model param, value)
    params: dict[str, torch.Tensor] = {}  # filled on first need: listing every parameter is slow on big models
    for key, value in tensors.items():
        short = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        found = _LORA_KEY.match(short)
        if found:
            factors.setdefault(found["path"], {})[found["kind"]] = value
            continue
        owner = next((p for p in saved_paths if short.startswith(p + ".")), None)
        if owner is not None:
            inner = short[len(owner) + 1 :]
            if inner.startswith("original_module."):
                continue  # PEFT with bias="all" also stores the frozen original; ours stays as it is
            saved_state.setdefault(owner, {})[inner.removeprefix("modules_to_save.")] = value
            continue
        if short.endswith(".base_layer.weight"):
            continue  # PEFT stores whole embedding tables beside embedding adapters; the base is ours
        # "<path>.base_layer.bias" in the file is "<path>.bias" in a model not yet wrapped, and vice versa
        spellings = (
            short,
            short.replace(".base_layer.", "."),
            short.rpartition(".")[0] + ".base_layer." + short.rpartition(".")[2],
        )
        params = params or dict(model.named_parameters())
        target = next((params[s] for s in spellings if s in params), None)
        if target is None:
            raise LorakitError(
                f"adapter tensor '{key}' names a parameter this model does not have; the adapter is for another model"
            )
        extras.append((key, target, value))

    specs = {}
    for path, parts in factors.items():
        module = _resolve(model, path)
        if module is None or not is_adaptable(base_of(module)):
            raise LorakitError(
                f"adapter tensor '{PREFIX}{path}.{next(iter(parts))}' targets module '{path}', which this model does "
                "not have; the adapter is for another model"
            )
        check_target(path, module, config, name)
        layer = module if isinstance(module, LoraLayer) else wrap(module)
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, Embedding) else ("lora_A", "lora_B")
        )
        if a_key not in parts or b_key not in parts:
            raise LorakitError(
                f"adapter for '{path}' lacks {a_key if a_key not in parts else b_key}; the file is incomplete"
            )
        r = parts[a_key].shape[0]
        for key, shape in ((a_key, layer._a_shape(r)), (b_key, layer._b_shape(r))):
            if tuple(parts[key].shape) != tuple(shape):
                raise LorakitError(
                    f"adapter tensor '{PREFIX}{path}.{key}' has shape {tuple(parts[key].shape)} but this model needs "
                    f"{tuple(shape)}; the adapter is for another model"
                )
        if config.use_dora and tuple(parts.get("lora_magnitude_vector", torch.empty(0)).shape) != (layer.out_dim,):
            raise LorakitError(
                f"adapter tensor '{PREFIX}{path}.lora_magnitude_vector' is missing or not of shape ({layer.out_dim},)"
            )
        alpha = config.alpha_for(path)
        scale = alpha / r**0.5 if config.use_rslora else alpha / r
        specs[path] = (
            module,
            layer,
            parts,
            a_key,
            b_key,
            AdapterSpec(r=r, scale=scale, dropout=config.dropout, use_dora=config.use_dora),
        )
    for key, target, value in extras:
        if target.shape != value.shape:
            raise LorakitError(
                f"adapter tensor '{key}' has shape {tuple(value.shape)} but the model's is {tuple(target.shape)}; the "
                "adapter is for another model"
            )
    for path, state in saved_state.items():
        expected = _resolve(model, path)
        expected = expected.original_module if isinstance(expected, SavedModule) else expected
        for key, value in state.items():
            own = expected.state_dict().get(key)
            if own is None or own.shape != value.shape:
                raise LorakitError(
                    f"adapter tensor '{PREFIX}{path}.{key}' does not fit module '{path}' of this model; the adapter "
                    "is for another model"
                )
    if not specs:
        raise LorakitError(f"{directory} holds no LoRA tensors (lora_A / lora_B); is it an adapter directory?")

    # Everything fits: now change the model.
    for path, (module, layer, parts, a_key, b_key, spec) in specs.items():
        if layer is not module:
            set_submodule(model, path, layer)
        layer.add_adapter(name, spec, factors=(parts[a_key], parts[b_key]))
        with torch.no_grad():
            if spec.use_dora:
                layer.lora_magnitude[name].copy_(parts["lora_magnitude_vector"])
    for path, state in saved_state.items():
        holder = _resolve(model, path)
        if not isinstance(holder, SavedModule):
            holder = SavedModule(holder)
            set_submodule(model, path, holder)
        holder.add_copy(name)
        holder.copies[name].load_state_dict(state, strict=False)
    with torch.no_grad():
        for _, target, value in extras:
            target.copy_(value)
    config.target_modules = sorted(specs)
    config.modules_to_save = sorted(saved_state) or None
    adapter_configs(model)[name] = config
    if trainable:
        set_trainable(model, name)
    elif freeze:  # like PEFT's inference mode: nothing trains
        model.requires_grad_(False)
    else:
        for _, layer, *_ in specs.values():
            for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
                if name in store:
                    store[name].requires_grad_(False)
        for path in saved_state:
            _resolve(model, path).copies[name].requires_grad_(False)
    if activate:
        set_adapter(model, name)
    return model
