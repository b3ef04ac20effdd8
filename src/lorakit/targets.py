"""Which modules a LoraConfig picks: names, dotted suffixes, regexes, "all-linear", per-architecture defaults;
and which parameters (target_parameters), with where their nested wrappers go.

a list entry t picks a module named t or ending in ".t";  a string is a regex matching the whole name;
"all-linear" picks every Linear / GPT-2 Conv1D except the output head;  None picks the model type's default.
"""

from __future__ import annotations

import re

from torch import nn

from .config import LoraConfig
from .errors import LorakitError
from .layers import ExpertParameter, LoraWrapper, SavedModule, innermost, is_adaptable, is_gpt2_conv1d, parameter_layers
from .model_state import walk
from .structure import default_targets

# Per-architecture defaults when target_modules is None (the LoRA paper adapts W_q and W_v), from PEFT's
# table; a model type not here gets its attention query/value projections found by name and shape
# (structure.py), so any transformers model has a default.
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
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "chatglm": ["query_key_value"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
    "phi3": ["qkv_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
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
    return module.base_layer if isinstance(module, LoraWrapper) else module


def _describe_candidates(model: nn.Module) -> str:
    leaves = sorted({path.rsplit(".", 1)[-1] for path, m in walk(model) if is_adaptable(base_of(m))})
    return (
        ", ".join(leaves[:40]) + (" ..." if len(leaves) > 40 else "")
        if leaves
        else "(none: no Linear/Conv1D/Embedding/Conv layers)"
    )


def _default_spec(model: nn.Module) -> list[str] | str:
    return default_targets(model, DEFAULT_TARGETS)  # the table, else attention q/v found by name and shape


def _picked(spec: list[str] | str, path: str, base: nn.Module, heads: set[str]) -> bool:
    if spec == "all-linear":
        return path not in heads and (isinstance(base, nn.Linear) or is_gpt2_conv1d(base))
    return matches(spec, path)


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> dict[str, tuple[nn.Module, list[str]]]:
    """{module path: (the module owning them, its targeted parameter names in registration order)}.

    PEFT's rule: parameter `name` of the module at `path` is picked when "path.name" equals an entry of
    target_parameters or ends with "." + entry; exclude_modules and layers_to_transform do not apply.
    """
    wanted = config.target_parameters or []
    found: dict[str, tuple[nn.Module, list[str]]] = {}
    for path, module in walk(model):
        if path.endswith(".base_layer") or isinstance(module, SavedModule):
            continue  # a nested wrapper: its owner is reached from the outermost one
        owner = innermost(module)
        names = [n for n in owner._parameters if matches(wanted, f"{path}.{n}")]
        if names:
            found[path] = (owner, names)
    if wanted and not found:
        raise LorakitError(
            f"target_parameters={wanted!r} matched no parameter; 3-D expert parameters here: "
            f"{_describe_parameters(model)}"
        )
    return found


def parameter_wrappers(model: nn.Module, config: LoraConfig) -> dict[str, tuple[nn.Module, LoraWrapper]]:
    """{path: (what sits there now, its wrapper)} for every parameter `config` targets (target_parameters).

    The parameters of one module nest, the first registered innermost, so the wrapper of the i-th of k
    sits at `<module path>` + ".base_layer" * (k-1-i): PEFT's nesting, hence its tensor keys. Adapters
    must all target the same parameters of a module (PEFT's rule): the nesting then never changes.
    """
    found = {}
    for path, (owner, names) in find_parameter_targets(model, config).items():
        current = model.get_submodule(path)
        if isinstance(current, (LoraWrapper, SavedModule)) and getattr(current, "parameter_name", None) is None:
            raise LorakitError(
                f"'{path}' is adapted (or saved) as a module by another adapter; adapt its parameters or the module, "
                "not both"
            )
        existing = parameter_layers(current)
        if existing and set(existing) != set(names):
            raise LorakitError(
                f"'{path}': this adapter's target_parameters pick {names} but another adapter adapts "
                f"{sorted(existing)}; adapters must target the same parameters of a module (as in PEFT)"
            )
        layers, below = [], owner
        for name in names:
            layers.append(existing.get(name) or _parameter_wrapper(path, below, name))
            below = layers[-1]
        for i, layer in enumerate(layers):
            found[path + ".base_layer" * (len(layers) - 1 - i)] = (current if i == len(layers) - 1 else layer, layer)
    return found


def _parameter_wrapper(path: str, below: nn.Module, name: str) -> LoraWrapper:
    try:
        return ExpertParameter(below, name)
    except LorakitError as err:
        raise LorakitError(f"'{path}.{name}': {err}") from None


def _describe_parameters(model: nn.Module) -> str:
    names = sorted(
        {f"{path.rsplit('.', 1)[-1]}.{n}" for path, m in walk(model) for n, p in innermost(m)._parameters.items()
         if p is not None and p.dim() == 3}
    )  # fmt: skip
    return ", ".join(names[:20]) if names else "(none)"


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs `config` adapts, in model order (target_parameters: find_parameter_targets)."""
    if config.target_modules == [] and config.target_parameters:
        return []
    spec = config.target_modules if config.target_modules is not None else _default_spec(model)
    saved = config.modules_to_save or []
    heads = output_head_names(model) if spec == "all-linear" else set()
    found, named, excluded = [], 0, 0
    for path, module in walk(model):
        base = base_of(module)
        if isinstance(module, SavedModule) or (saved and matches(saved, path)) or not _picked(spec, path, base, heads):
            continue
        if not is_adaptable(base):
            if isinstance(spec, str):
                continue  # a regex may also match containers; only adaptable layers count
            raise LorakitError(
                f"target '{path}' is a {type(base).__name__}, which LoRA cannot adapt as a module; "
                "target Linear, GPT-2 Conv1D, Embedding or Conv1d/2d/3d layers, or its weights with target_parameters"
            )
        named += 1
        if config.exclude_modules is not None and matches(config.exclude_modules, path):
            excluded += 1
            continue
        layers = config.layers_to_transform
        if layers is not None and layer_index(path, config.layers_pattern) not in layers:
            continue
        found.append((path, module))
    if not found:
        raise LorakitError(_nothing_left(spec, named, excluded, config, model))
    return found


def _nothing_left(spec, named: int, excluded: int, config: LoraConfig, model: nn.Module) -> str:
    if not named:
        return f"target_modules={spec!r} matched no module; adaptable modules: {_describe_candidates(model)}"
    if excluded == named:
        return (
            f"exclude_modules={config.exclude_modules!r} removes all {named} modules that target_modules={spec!r} "
            "matched; exclude fewer"
        )
    return (
        f"layers_to_transform={config.layers_to_transform!r} keeps none of the {named} modules that "
        f"target_modules={spec!r} matched (block indices found: "
        f"{sorted({i for i in (layer_index(p, config.layers_pattern) for p, _ in walk(model)) if i is not None})})"
    )
