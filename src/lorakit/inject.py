"""inject(): find the modules a LoraConfig targets, wrap each in a LoRA layer in place, freeze the rest.

Wrapping swaps the module in its parent (PEFT's trick), so it works on any nn.Module tree.
Nothing is changed until every target has been checked, so a bad config leaves the model as it was.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .adapters import set_adapter, set_trainable
from .config import LoraConfig
from .errors import LorakitError
from .layers import AdapterSpec, LoraLayer, SavedModule, is_adaptable, is_gpt2_conv1d, wrap
from .registry import adapter_configs, check_adapter_name, set_submodule, walk

# Per-architecture defaults when target_modules is None (the LoRA paper adapts W_q and W_v).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
}


def matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, layers_pattern: str | None) -> int | None:
    pattern = rf"(?:^|\.)(?:{layers_pattern})\.(\d+)\." if layers_pattern else r"(?:^|\.)(\d+)\."
    found = re.search(pattern, name)
    return int(found.group(1)) if found else None


def output_head_names(model: nn.Module) -> set[str]:
    heads = {"lm_head"}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        heads |= {path for path, module in walk(model) if module is head}
    return heads


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _describe_candidates(model: nn.Module) -> str:
    leaves = sorted({path.rsplit(".", 1)[-1] for path, m in walk(model) if is_adaptable(base_of(m))})
    return (
        ", ".join(leaves[:40]) + (" ..." if len(leaves) > 40 else "")
        if leaves
        else "(none: no Linear/Conv1D/Embedding/Conv layers)"
    )


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs `config` adapts, in model order."""
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise LorakitError(
                f"LoraConfig.target_modules is not set and model type {model_type!r} has no default; "
                f"pick some of: {_describe_candidates(model)}"
            )
        spec = DEFAULT_TARGETS[model_type]
    saved = config.modules_to_save or []
    heads = output_head_names(model) if spec == "all-linear" else set()
    found = []
    for path, module in walk(model):
        base = base_of(module)
        if isinstance(module, SavedModule) or (saved and matches(saved, path)):
            continue
        if spec == "all-linear":
            if path in heads or not (isinstance(base, nn.Linear) or is_gpt2_conv1d(base)):
                continue
        elif not matches(spec, path):
            continue
        if config.exclude_modules is not None and matches(config.exclude_modules, path):
            continue
        if (
            config.layers_to_transform is not None
            and layer_index(path, config.layers_pattern) not in config.layers_to_transform
        ):
            continue
        if not is_adaptable(base):
            if isinstance(spec, str) and spec != "all-linear":
                continue  # a regex may also match containers; only adaptable layers count
            raise LorakitError(
                f"target '{path}' is a {type(base).__name__}, which LoRA cannot adapt; "
                "target Linear, GPT-2 Conv1D, Embedding or Conv1d/2d/3d layers"
            )
        found.append((path, module))
    if not found:
        raise LorakitError(
            f"target_modules={spec!r} matched no module; adaptable modules: {_describe_candidates(model)}"
        )
    return found


def check_target(path: str, module: nn.Module, config: LoraConfig, name: str) -> None:
    """Raise now for anything wrapping would refuse, so a failure changes nothing."""
    base = base_of(module)
    kind = type(base).__name__
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and base.groups != 1:
        raise LorakitError(
            f"'{path}' is a grouped convolution (groups={base.groups}), which LoRA cannot adapt; exclude it"
        )
    if config.use_dora and not (isinstance(base, nn.Linear) or is_gpt2_conv1d(base)):
        raise LorakitError(
            f"use_dora works on Linear and GPT-2 Conv1D layers, but '{path}' is {kind}; exclude it or set "
            "use_dora=False"
        )
    if isinstance(module, LoraLayer):
        if config.init == "pissa" or any(s.init == "pissa" for s in module.specs.values()):
            raise LorakitError(
                f"'{path}' would hold a PiSSA adapter beside another; PiSSA rewrites the base weight, so it must be "
                "alone"
            )
    if not base.weight.is_floating_point():
        raise LorakitError(f"'{path}' has a {base.weight.dtype} weight; LoRA needs a floating-point base weight")


def inject(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    base_dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Add adapter `name` to every module `config` targets, make it the active and only trainable part.

    base_dtype=torch.bfloat16 stores the frozen base in bf16 (norms stay fp32) and runs the
    forward under bf16 autocast, while adapters and their optimizer state stay fp32.
    """
    if not isinstance(config, LoraConfig):
        raise LorakitError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    check_adapter_name(name)
    configs = adapter_configs(model)
    if name in configs:
        raise LorakitError(
            f"adapter '{name}' already exists; delete it with lorakit.delete_adapter or pick another name"
        )
    targets = find_targets(model, config)
    for path, module in targets:
        check_target(path, module, config, name)
    saved = [(p, m) for p, m in walk(model) if config.modules_to_save and matches(config.modules_to_save, p)]
    if config.modules_to_save and not saved:
        raise LorakitError(
            f"modules_to_save={config.modules_to_save!r} matched no module; check the names with print(model)"
        )

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for path, module in targets:
        layer = module if isinstance(module, LoraLayer) else wrap(module)
        if layer is not module:
            set_submodule(model, path, layer)
        spec = AdapterSpec(
            r=config.rank_for(path),
            scale=config.scale_for(path),
            dropout=float(config.dropout),
            use_dora=config.use_dora,
            init=config.init,
        )
        layer.add_adapter(name, spec, generator=generator)
    for path, module in saved:
        holder = module if isinstance(module, SavedModule) else SavedModule(module)
        if holder is not module:
            set_submodule(model, path, holder)
        holder.add_copy(name)
    configs[name] = config
    set_trainable(model, name)
    set_adapter(model, name)
    if base_dtype is not None:
        cast_base(model, base_dtype)
    return model


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for store in (module.lora_A, module.lora_B, module.lora_magnitude):
                ids |= {id(p) for p in store.values()}
        elif isinstance(module, SavedModule):
            ids |= {id(p) for p in module.copies.parameters()}
    return ids


def _upcast_output(module: nn.Module, args, output):
    return output.float() if torch.is_tensor(output) and output.dtype != torch.float32 else output


def _enter_autocast(module: nn.Module, args) -> None:
    device = next(module.parameters()).device.type
    ctx = torch.autocast(device_type=device, dtype=module.lorakit_base_dtype)
    ctx.__enter__()
    module.__dict__.setdefault("_lorakit_autocast_stack", []).append(ctx)


def _exit_autocast(module: nn.Module, args, output) -> None:
    module.__dict__["_lorakit_autocast_stack"].pop().__exit__(None, None, None)


def cast_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen base weights in `dtype` and run forward under autocast to it.

    Norm layers keep fp32 weights and embeddings hand fp32 vectors to the residual stream, so the
    numerics match running the fp32 model under autocast; adapters are never cast.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise LorakitError(f"base_dtype={dtype} is not supported; use torch.bfloat16 (or torch.float16 on GPUs)")
    keep = _adapter_parameter_ids(model)
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            continue
        for param in module.parameters(recurse=False):
            if id(param) not in keep and not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(dtype)
        if isinstance(module, nn.Embedding) and not getattr(module, "_lorakit_upcast", False):
            module.register_forward_hook(_upcast_output)
            module._lorakit_upcast = True
    if "lorakit_base_dtype" not in model.__dict__:
        model.register_forward_pre_hook(_enter_autocast)
        model.register_forward_hook(_exit_autocast, always_call=True)
    model.lorakit_base_dtype = dtype
