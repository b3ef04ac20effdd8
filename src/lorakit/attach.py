"""The one way an adapter gets onto a model: plan the whole change, validate it, then apply it.

    inject()        plan_new(model, config)          fresh factors, initialised at apply time
    load_adapter()  plan_file(model, adapter_file)    factors, DoRA magnitudes, saved modules, biases
    combine()       AdapterPlan(...) with factors     Σ wᵢ·sᵢ·Bᵢ·Aᵢ as one concatenated adapter
    the server      plan_file(...) refused when plan.changes_base

Planning touches nothing: it wraps layers only in memory, checks every tensor against the model
(names, kinds the config allows, shapes, ranks, dtypes, finite values) and raises a LorakitError
naming the first problem. `apply` (apply_plan.py) then changes the model; if anything still fails there (memory),
it undoes every step, so after any error the model is exactly as before: same module types, same
parameters, bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .adapters import canonical, owned_biases
from .config import LoraConfig, pattern_matches
from .errors import LorakitError
from .layers import AdapterSpec, LoraWrapper, SavedModule, layer_class, wrap
from .model_state import adapter_configs, check_adapter_name, walk
from .targets import base_of, find_targets, matches, parameter_wrappers

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TASK_SUFFIXES = {
    "CAUSAL_LM": ("ForCausalLM",),
    "SEQ_CLS": ("ForSequenceClassification",),
    "TOKEN_CLS": ("ForTokenClassification",),
    "QUESTION_ANS": ("ForQuestionAnswering",),
    "SEQ_2_SEQ_LM": ("ForConditionalGeneration", "ForSeq2SeqLM"),
}


@dataclass
class LayerChange:
    """One adapted module: the wrapper to put at `path` and what to add to it."""

    path: str
    module: nn.Module  # what sits at `path` now (a base layer or a LoraWrapper)
    layer: LoraWrapper  # the wrapper (== module when it is already a LoraWrapper)
    spec: AdapterSpec
    factors: tuple[Tensor, Tensor] | None = None  # (A, B) shaped like the layer's; None = initialise per spec.init
    magnitude: Tensor | None = None  # DoRA's m, from a file


@dataclass
class SavedChange:
    """One module trained in full with the adapter (modules_to_save)."""

    path: str
    module: nn.Module
    state: dict[str, Tensor] | None = None  # the copy's state; None = a fresh copy of the original


@dataclass
class AdapterPlan:
    name: str
    config: LoraConfig
    layers: list[LayerChange]
    saved: list[SavedChange] = field(default_factory=list)
    biases: dict[str, Tensor] = field(default_factory=dict)  # base parameter name -> new value (bias="all"/"lora_only")

    @property
    def changes_base(self) -> bool:
        """True when the adapter writes shared base parameters (its biases), which every other user sees."""
        return self.config.bias != "none"


@dataclass
class AdapterFile:
    """A parsed adapter file, format-neutral: what formats/ hand to plan_file.

    factors: module path -> {"A", "B", "magnitude"} tensors;  others: every other tensor by its module-path
    name (saved-module states, biases, copies of base weights);  keys: path/kind -> the key in the file.
    """

    config: LoraConfig
    factors: dict[str, dict[str, Tensor]]
    others: dict[str, Tensor]
    keys: dict[str, str]
    task_type: str | None = None


# ----- shared checks -----------------------------------------------------------------------------
def check_new_name(model: nn.Module, name: str) -> None:
    check_adapter_name(name)
    if name in adapter_configs(model):
        raise LorakitError(
            f"adapter '{name}' already exists; delete it with lorakit.delete_adapter or pick another name"
        )


def check_tensor(key: str, value: Tensor) -> None:
    """Floating point and at least 1-d: what any adapter tensor must be (finiteness: check_finite)."""
    if value.dtype not in FLOAT_DTYPES:
        raise LorakitError(f"adapter tensor '{key}' has dtype {value.dtype}; adapter tensors must be floating point")
    if value.dim() == 0:
        raise LorakitError(f"adapter tensor '{key}' is a 0-d scalar; LoRA factors are matrices")


def check_finite(tensors: dict[str, Tensor]) -> None:
    """No NaN or infinity in any of `tensors`. A float64 sum is finite exactly when every fp32/fp16/bf16
    value is (it cannot overflow), and is much cheaper than isfinite; the culprit is searched only then."""
    sums = [v.sum(dtype=torch.float64) for v in tensors.values()]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return
    key = next((k for k, v in tensors.items() if not bool(torch.isfinite(v).all())), None)
    if key is not None:  # (a float64 tensor of huge finite values can overflow its sum: then all is well)
        raise LorakitError(f"adapter tensor '{key}' holds NaN or infinite values; the adapter is corrupt")


def check_target(path: str, layer: LoraWrapper, spec: AdapterSpec) -> None:
    """Raise now for anything applying would refuse (the layer's own rules), so a failure changes nothing."""
    problem = layer.refusal(spec)
    if problem:
        raise LorakitError(f"'{path}': {problem}")


def _check_patterns(config: LoraConfig, paths: list[str]) -> None:
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field_name):
            if not any(pattern_matches(key, p) for p in paths):
                raise LorakitError(
                    f"LoraConfig.{field_name} key {key!r} matches none of the {len(paths)} adapted modules "
                    f"(e.g. {paths[0]}); use a module-name suffix or a regex that matches one"
                )


def _wrapper(path: str, module: nn.Module) -> LoraWrapper:
    """The LoRA layer for `path`: the one already there, or a new wrapper (not yet put in the model)."""
    if isinstance(module, LoraWrapper):
        return module
    try:
        return wrap(module)
    except LorakitError as err:
        raise LorakitError(f"'{path}': {err}") from None


def _saved_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    if not config.modules_to_save:
        return []
    return [(p, m) for p, m in walk(model) if matches(config.modules_to_save, p) and not isinstance(m, LoraWrapper)]


# ----- plans -------------------------------------------------------------------------------------
def plan_new(model: nn.Module, config: LoraConfig, name: str) -> AdapterPlan:
    """The change inject() makes: fresh adapters on every module `config` targets."""
    if not isinstance(config, LoraConfig):
        raise LorakitError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    check_new_name(model, name)
    changes = []
    for path, module in find_targets(model, config):
        layer, r = _wrapper(path, module), config.rank_for(path)
        spec = AdapterSpec(r, config.scale_for(path), float(config.dropout), config.use_dora, config.init)
        check_target(path, layer, spec)
        changes.append(LayerChange(path, module, layer, spec))
    for path, (module, layer) in parameter_wrappers(model, config).items():
        key = layer.target_key(path)
        spec = AdapterSpec(
            config.rank_for(key), config.scale_for(key), float(config.dropout), config.use_dora, config.init
        )
        check_target(key, layer, spec)
        changes.append(LayerChange(path, module, layer, spec))
    _check_patterns(config, [c.layer.target_key(c.path) for c in changes])
    saved = [SavedChange(p, m) for p, m in _saved_targets(model, config)]
    if config.modules_to_save and not saved:
        raise LorakitError(
            f"LoraConfig.modules_to_save={config.modules_to_save!r} matched no module; check the names with "
            "print(model)"
        )
    return AdapterPlan(name, config, changes, saved)


def plan_file(model: nn.Module, adapter: AdapterFile, name: str) -> AdapterPlan:
    """The change loading `adapter` makes, checked tensor by tensor against `model` and the adapter's config."""
    check_new_name(model, name)
    config = adapter.config
    _check_task(model, adapter.task_type)
    targets = _targeted(model, config)
    wrapped = parameter_wrappers(model, config) if config.target_parameters else {}
    changes = [
        _layer_change(model, adapter, path, parts, targets, wrapped.get(path))
        for path, parts in adapter.factors.items()
    ]
    if not changes:
        raise LorakitError("the adapter holds no LoRA tensors (lora_A / lora_B); is it an adapter file?")
    _check_coverage(config, [c for c in changes if c.path not in wrapped], adapter, targets)
    missing = sorted(set(wrapped) - set(adapter.factors))
    if missing:
        raise LorakitError(
            f"the adapter has no tensors for parameter '{wrapped[missing[0]][1].target_key(missing[0])}', which "
            f"target_parameters={config.target_parameters!r} selects on this model; the file is incomplete or for "
            "another model"
        )
    _check_patterns(config, [c.layer.target_key(c.path) for c in changes])
    modules = [c.path for c in changes if c.layer.parameter_name is None]
    saved, biases = _resolve_others(model, adapter, set(modules))
    config.target_modules = modules  # what was adapted, exactly
    config.target_parameters = sorted(c.layer.target_key(c.path) for c in changes if c.path in wrapped) or None
    config.modules_to_save = [s.path for s in saved] or None
    config.layers_to_transform = config.layers_pattern = config.exclude_modules = None
    return AdapterPlan(name, config, changes, saved, biases)


def _check_task(model: nn.Module, task_type: str | None) -> None:
    suffixes = TASK_SUFFIXES.get(task_type or "")
    cls = type(model).__name__
    model_task = next((t for t, ends in TASK_SUFFIXES.items() if cls.endswith(ends)), None)
    if suffixes and model_task and model_task != task_type:
        raise LorakitError(
            f"the adapter is for task_type {task_type} but the model is a {cls} ({model_task}); "
            "load it into the matching model class"
        )


def _targeted(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module] | None:
    """The modules the adapter's config selects on this model (None: the config names none)."""
    if config.target_modules is None and config.exclude_modules is None:
        return None
    try:
        return dict(find_targets(model, config))
    except LorakitError:
        return {}  # selects nothing here: each tensor's module is then looked up (and named) one by one


def _layer_change(
    model: nn.Module,
    adapter: AdapterFile,
    path: str,
    parts: dict[str, Tensor],
    targets: dict | None,
    wrapped: tuple[nn.Module, LoraWrapper] | None = None,
) -> LayerChange:
    """The change for the factors at `path`: a module's wrapper, or `wrapped` (a parameter's, pre-built)."""
    config, key = adapter.config, adapter.keys
    module, layer = wrapped if wrapped is not None else (_module_at(model, path, targets), None)
    first = key[f"{path}/{next(iter(parts))}"]
    if module is None or isinstance(module, SavedModule) or not (layer or _is_wrappable(module)):
        raise LorakitError(
            f"adapter tensor '{first}' targets '{path}', which this model does not have as an adaptable layer; "
            "the adapter is for another model"
        )
    layer = layer or _wrapper(path, module)
    name, r = layer.target_key(path), layer.rank_of(parts["A"])
    if r != config.rank_for(name):
        raise LorakitError(
            f"adapter tensor '{key[f'{path}/A']}' has rank {r} but adapter_config.json gives '{name}' "
            f"r={config.rank_for(name)} (r / rank_pattern); the file and its config disagree"
        )
    spec = AdapterSpec(r=r, scale=config.scale_for(name), dropout=float(config.dropout), use_dora=config.use_dora)
    check_target(name, layer, spec)
    for kind, shape in (("A", layer._a_shape(r)), ("B", layer._b_shape(r))):
        if tuple(parts[kind].shape) != tuple(shape):
            raise LorakitError(
                f"adapter tensor '{key[f'{path}/{kind}']}' has shape {tuple(parts[kind].shape)} but this model "
                f"needs {tuple(shape)}; the adapter is for another model"
            )
    if config.use_dora != ("magnitude" in parts):
        problem = "lacks its DoRA magnitude" if config.use_dora else "has a DoRA magnitude but use_dora is false"
        raise LorakitError(f"adapter layer '{path}' {problem}; the file and adapter_config.json disagree")
    magnitude = parts.get("magnitude")
    if magnitude is not None and tuple(magnitude.shape) != layer.magnitude_shape():
        raise LorakitError(
            f"adapter tensor '{key[f'{path}/magnitude']}' has shape {tuple(magnitude.shape)} but this model needs "
            f"{layer.magnitude_shape()}; the adapter is for another model"
        )
    return LayerChange(path, module, layer, spec, factors=(parts["A"], parts["B"]), magnitude=magnitude)


def _module_at(model: nn.Module, path: str, targets: dict | None) -> nn.Module | None:
    module = targets.get(path) if targets else None
    if module is None:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
    return module


def _is_wrappable(module: nn.Module) -> bool:
    try:
        return layer_class(base_of(module)) is not None
    except LorakitError:
        return False


def _check_coverage(config: LoraConfig, changes: list[LayerChange], adapter: AdapterFile, targets) -> None:
    """The file's adapted modules must be exactly those its config targets on this model."""
    if targets is None:
        return  # nothing to compare with: the tensors say what is adapted
    got = {c.path for c in changes}
    extra = sorted(got - set(targets))
    if extra:
        raise LorakitError(
            f"adapter tensor '{adapter.keys[f'{extra[0]}/A']}' adapts '{extra[0]}', which target_modules="
            f"{config.target_modules!r} does not select; the file and adapter_config.json disagree"
        )
    missing = sorted(set(targets) - got)
    if missing:
        raise LorakitError(
            f"the adapter has no tensors for '{missing[0]}' ({len(missing)} targeted module(s) missing), which "
            f"target_modules={config.target_modules!r} selects on this model; the file is incomplete or for "
            "another model"
        )


def _resolve_others(model: nn.Module, adapter: AdapterFile, adapted: set[str]) -> tuple[list[SavedChange], dict]:
    """Sort every non-LoRA tensor into a saved module's state or an allowed bias; refuse anything else."""
    config = adapter.config
    targets = dict(_saved_targets(model, config))
    owned = owned_biases(model, config, adapted, exclude=set(targets))
    states: dict[str, dict[str, Tensor]] = {}
    biases: dict[str, Tensor] = {}
    base: dict[str, Tensor] | None = None  # the model's parameters by canonical name, built on first need
    for name, value in adapter.others.items():
        owner = next((p for p in targets if name.startswith(p + ".")), None)
        if owner is not None:
            _saved_entry(states.setdefault(owner, {}), targets[owner], name, name[len(owner) + 1 :], value)
        elif canonical(name) in owned:
            _check_like(name, value, owned[canonical(name)])
            if canonical(name) in biases and not torch.equal(biases[canonical(name)], value):
                raise LorakitError(f"adapter tensor '{name}' appears twice with different values; the file is corrupt")
            biases[canonical(name)] = value
        else:
            base = base if base is not None else {canonical(n): p for n, p in model.named_parameters()}
            _refuse_base_tensor(name, value, base.get(canonical(name)), config)
    missing_bias = sorted(set(owned) - set(biases))
    if missing_bias:
        raise LorakitError(
            f"the adapter lacks the bias '{missing_bias[0]}' that bias={config.bias!r} saves with it; "
            "the file is incomplete or for another model"
        )
    saved = []
    for path, module in targets.items():
        reference = _original(module).state_dict()
        state = states.get(path, {})
        if set(state) != set(reference):
            gap = sorted(set(reference) - set(state)) or sorted(set(state) - set(reference))
            raise LorakitError(
                f"the adapter's saved module '{path}' (modules_to_save) does not match this model's: "
                f"'{path}.{gap[0]}' is {'missing' if gap[0] in reference else 'unknown'}; the file is incomplete "
                "or for another model"
            )
        saved.append(SavedChange(path, module, state))
    return saved, biases


def _original(module: nn.Module) -> nn.Module:
    return module.original_module if isinstance(module, SavedModule) else module


def _saved_entry(state: dict[str, Tensor], module: nn.Module, key: str, inner: str, value: Tensor) -> None:
    reference = _original(module).state_dict()
    if inner.startswith("original_module."):  # PEFT keeps the untouched original beside the trained copy
        own = reference.get(inner.removeprefix("original_module."))
        if own is None or own.shape != value.shape or not torch.equal(own.to(value.dtype), value):
            raise LorakitError(
                f"adapter tensor '{key}' is not this model's original weight; the adapter is for another base"
            )
        return
    inner = inner.removeprefix("modules_to_save.")
    own = reference.get(inner)
    if own is None:
        raise LorakitError(
            f"adapter tensor '{key}' is not part of that module in this model; the adapter is for another model"
        )
    if own.is_floating_point():
        _check_like(key, value, own)
    elif value.dtype != own.dtype or value.shape != own.shape:
        raise LorakitError(
            f"adapter tensor '{key}' has dtype {value.dtype} / shape {tuple(value.shape)}, not {own.dtype}"
        )
    if inner in state and not torch.equal(state[inner], value):
        raise LorakitError(f"adapter tensor '{key}' appears twice with different values; the file is corrupt")
    state[inner] = value


def _check_like(key: str, value: Tensor, own: Tensor) -> None:
    """A tensor that replaces one of the model's: floating, the same shape, finite."""
    if value.dtype not in FLOAT_DTYPES or tuple(value.shape) != tuple(own.shape):
        raise LorakitError(
            f"adapter tensor '{key}' has shape {tuple(value.shape)} ({value.dtype}) but the model's is "
            f"{tuple(own.shape)}; the adapter is for another model"
        )
    check_finite({key: value})


def _refuse_base_tensor(key: str, value: Tensor, own: Tensor | None, config: LoraConfig) -> None:
    """A tensor that is neither a factor, a saved module nor an owned bias: only an exact copy of a base
    weight that PEFT marks as such (an embedding's `base_layer.weight`) is accepted, and ignored."""
    if own is None:
        raise LorakitError(
            f"adapter tensor '{key}' names a parameter this model does not have; the adapter is for another model"
        )
    marked_copy = ".base_layer." in key or ".original_module." in key
    if marked_copy and own.shape == value.shape and torch.equal(own.detach().to(value.dtype), value):
        return
    if key.endswith("bias"):
        raise LorakitError(
            f"adapter tensor '{key}' is a bias, which adapter_config.json's bias={config.bias!r} does not let the "
            "adapter change; the file and its config disagree"
        )
    raise LorakitError(
        f"adapter tensor '{key}' would overwrite the base model's '{canonical(key)}'; a LoRA adapter may not "
        "change base weights (list the module in modules_to_save if it was trained in full)"
    )
