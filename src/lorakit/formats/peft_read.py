"""Reading PEFT's adapter format strictly: adapter_config.json + adapter_model.safetensors -> AdapterFile.

Every config field is type-checked (booleans are booleans, numbers finite and in range, patterns valid
regexes); fields lorakit does not implement are refused when they are set to anything but their
"off" value. Every tensor key must be one PEFT writes:

    base_model.model.<path>.lora_A.weight / lora_B.weight          (r x k...), (d x r...)
    base_model.model.<path>.lora_embedding_A / lora_embedding_B    embeddings
    base_model.model.<path>.lora_magnitude_vector                  DoRA's m
    base_model.model.<other parameter>                             saved modules, biases, base copies

Factors are checked here without a model (floating dtype, finite, A and B paired with one rank);
attach.plan_file then checks everything against the model, the rank the config
gives each module included (an expert parameter's lora_A holds E·r rows: only the model knows E).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..apply_plan import apply
from ..attach import AdapterFile, check_finite, check_tensor, plan_file
from ..config import BIASES, LoraConfig
from ..errors import LorakitError
from ..io import inside, read_json, read_safetensors
from .peft import CONFIG_FILE, PREFIX, WEIGHTS_FILE

_LORA_KEY = re.compile(
    r"^(?P<path>.+)\.(?P<kind>lora_(?:A|B)\.weight|lora_embedding_[AB]|lora_magnitude_vector(?:\.weight)?)$"
)
_KIND = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
}
# PEFT config fields that say nothing about the weights' meaning (metadata, or how they were initialised).
_INFORMATIONAL = {
    "peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "auto_mapping", "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "eva_config", "loftq_config", "corda_config", "lora_ga_config", "init_lora_weights",
}  # fmt: skip
# init_lora_weights values after which the saved factors only make sense on a base PEFT rewrote
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors, read strictly from regular files inside `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LorakitError(f"adapter directory {directory} does not exist; give the folder holding {CONFIG_FILE}")
    if not (directory / WEIGHTS_FILE).exists() and (directory / "adapter_model.bin").is_file():
        raise LorakitError(
            f"{directory} holds only adapter_model.bin; lorakit reads safetensors only "
            "(re-save with PEFT's safe_serialization=True)"
        )
    config = read_json(inside(directory, CONFIG_FILE))
    if not isinstance(config, dict):
        raise LorakitError(f"{directory / CONFIG_FILE} must hold a JSON object, not {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LorakitError(
            f"{directory / CONFIG_FILE} has peft_type={peft_type!r}; this loader reads LoRA adapters (peft_type LORA)"
        )
    return config, read_safetensors(inside(directory, WEIGHTS_FILE))


# ----- the config -------------------------------------------------------------------------------
def _bad(key: str, value: Any, allowed: str) -> LorakitError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return LorakitError(f"adapter_config.json has {key}={shown}: {allowed}")


def _typed(config: dict, key: str, kinds: tuple, default: Any, allowed: str) -> Any:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise _bad(key, value, allowed)
    return value


def _check_unsupported(config: dict) -> None:
    known = _INFORMATIONAL | set(_FIELDS)
    for key, value in config.items():
        if key not in known and not key.startswith("lorakit_") and value not in (None, False, {}, [], ""):
            raise _bad(key, value, "lorakit does not support this PEFT option; re-train or re-save without it")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise _bad("init_lora_weights", init, "expected true, false or a method name")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise _bad(
            "init_lora_weights", init, "this adapter is relative to a base that PEFT rewrote at initialisation; "
            "re-save it with PEFT's path_initial_model_for_weight_conversion so it applies to the original base"
        )  # fmt: skip


_FIELDS = {  # PEFT key -> (LoraConfig field, JSON types, default, what is allowed)
    "r": ("r", (int,), 8, "the rank must be an integer >= 1"),
    "lora_alpha": ("alpha", (int, float), 8, "lora_alpha must be a finite number > 0"),
    "lora_dropout": ("dropout", (int, float), 0.0, "lora_dropout must be a number in [0, 1)"),
    "target_modules": ("target_modules", (list, str), None, "expected a list of module names or a regex"),
    "exclude_modules": ("exclude_modules", (list, str), None, "expected a list of module names or a regex"),
    "layers_to_transform": ("layers_to_transform", (list, int), None, "expected a block index or a list"),
    "layers_pattern": ("layers_pattern", (list, str), None, "expected a regex or a list of names"),
    "rank_pattern": ("rank_pattern", (dict,), {}, "expected an object {module: rank}"),
    "alpha_pattern": ("alpha_pattern", (dict,), {}, "expected an object {module: alpha}"),
    "bias": ("bias", (str,), "none", f"expected one of {', '.join(BIASES)}"),
    "modules_to_save": ("modules_to_save", (list,), None, "expected a list of module names"),
    "use_rslora": ("use_rslora", (bool,), False, "expected true or false"),
    "use_dora": ("use_dora", (bool,), False, "expected true or false"),
    "target_parameters": ("target_parameters", (list,), None, "expected a list of parameter names"),
}


def config_from_peft(peft_config: dict) -> LoraConfig:
    """A validated LoraConfig from adapter_config.json's fields; one clear line for anything wrong."""
    _check_unsupported(peft_config)
    values = {
        field: _typed(peft_config, key, kinds, default, allowed)
        for key, (field, kinds, default, allowed) in _FIELDS.items()
    }
    if isinstance(values["layers_pattern"], list):
        values["layers_pattern"] = (
            "|".join(re.escape(p) for p in values["layers_pattern"] if isinstance(p, str)) or None
        )
    values["init"] = "gaussian" if peft_config.get("init_lora_weights") == "gaussian" else "kaiming"
    try:
        return LoraConfig(**values)
    except LorakitError as err:
        raise LorakitError(f"adapter_config.json: {str(err).replace('LoraConfig.', '')}") from None


# ----- the tensors ------------------------------------------------------------------------------
def parse_adapter(peft_config: dict, tensors: dict[str, torch.Tensor]) -> AdapterFile:
    """Sort the file's tensors into factors and others, checking what can be checked without a model."""
    config = config_from_peft(peft_config)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    keys: dict[str, str] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise LorakitError(
                f"adapter tensor '{key}' does not start with '{PREFIX}'; this is not a PEFT adapter file"
            )
        short = key[len(PREFIX) :]
        found = _LORA_KEY.match(short)
        if found is None:
            if ".lora_" in short:
                raise LorakitError(
                    f"adapter tensor '{key}' is not a key PEFT writes (lora_A.weight, lora_B.weight, "
                    "lora_embedding_A/B, lora_magnitude_vector); the file is corrupt or from another tool"
                )
            others[short] = value
            continue
        path, kind = found["path"], _KIND[found["kind"]]
        if kind in factors.setdefault(path, {}):
            raise LorakitError(f"adapter tensor '{key}' repeats {keys[f'{path}/{kind}']}; the file is corrupt")
        check_tensor(key, value)
        factors[path][kind], keys[f"{path}/{kind}"] = value, key
    check_finite({keys[f"{p}/{k}"]: v for p, parts in factors.items() for k, v in parts.items()})
    for path, parts in factors.items():
        _check_pair(config, path, parts, keys)
    return AdapterFile(config, factors, others, keys, task_type=peft_config.get("task_type"))


def _check_pair(config: LoraConfig, path: str, parts: dict[str, torch.Tensor], keys: dict[str, str]) -> None:
    for kind, name in (("A", "lora_A"), ("B", "lora_B")):
        if kind not in parts:
            raise LorakitError(f"adapter for '{path}' lacks {name}; the file is incomplete")
    a, b = parts["A"], parts["B"]
    if a.dim() < 2 or b.dim() < 2:
        raise LorakitError(
            f"adapter tensors for '{path}' must be matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    r = a.shape[0]
    if r < 1 or b.shape[1] != r:
        raise LorakitError(
            f"adapter tensors for '{path}' disagree on the rank: {keys[f'{path}/A']} has {r} rows, "
            f"{keys[f'{path}/B']} has {b.shape[1]} columns (both must equal r >= 1)"
        )


def read_adapter_file(directory: str | Path) -> AdapterFile:
    return parse_adapter(*read_adapter(directory))


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    name: str = "default",
    trainable: bool = False,
    activate: bool = True,
    freeze: bool = True,
    allow_base_changes: bool = True,
) -> nn.Module:
    """Add the adapter saved in `directory` (by lorakit or PEFT) as `name`; returns the model.
    lorakit.load_adapter (formats/detect.py) also reads diffusers and kohya files and checks the base fingerprint."""
    return attach_file(model, read_adapter_file(directory), name, trainable, activate, freeze, allow_base_changes)


def attach_file(
    model: nn.Module,
    adapter: AdapterFile,
    name: str = "default",
    trainable: bool = False,
    activate: bool = True,
    freeze: bool = True,
    allow_base_changes: bool = True,
) -> nn.Module:
    """Attach a parsed adapter file (any format, converted to PEFT's layout) through the one attach path.

    Everything in the file is checked against the model before anything changes (attach.plan_file).
    The model ends up frozen, unless trainable=True, which makes this adapter the trainable part.
    activate=True makes it the adapter forward uses. freeze=False (with trainable=False) freezes only
    the new adapter's tensors: a server whose model is frozen once saves a walk over every parameter.
    allow_base_changes=False refuses adapters that set shared base biases (a server for many users).
    """
    plan = plan_file(model, adapter, name)
    if plan.changes_base and not allow_base_changes:
        raise LorakitError(
            f"adapter '{name}' trains biases (bias={plan.config.bias!r}), which would change the base model for "
            "every other adapter; re-save it with bias='none'"
        )
    apply(model, plan, trainable=trainable, freeze=freeze, activate=activate)
    return model
