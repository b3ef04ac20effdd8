"""LoraConfig: what to adapt and how.

An adapter adds ΔW = s·B·A to each targeted weight W0 (d x k), with A (r x k), B (d x r) and
s = alpha / r (or alpha / sqrt(r) with rsLoRA, which keeps the update's scale steady as r grows).
Field names follow PEFT where PEFT has the concept, so its adapter_config.json maps one to one.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import LorakitError

INITS = ("kaiming", "gaussian", "pissa")
BIASES = ("none", "all", "lora_only")
MAX_RANK = 1 << 20  # a sanity cap; the real bound (the layer's size) is checked when the adapter is planned


def _fail(field_name: str, value: Any, allowed: str) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise LorakitError(f"LoraConfig.{field_name}={shown} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and 0 < value <= MAX_RANK


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_regex(field_name: str, pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern:
        _fail(field_name, pattern, "each key must be a non-empty module name or regular expression")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        _fail(field_name, pattern, f"it is not a valid regular expression ({err})")


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """s = alpha / r (the LoRA paper), or alpha / sqrt(r) with rsLoRA: the one place the scale is computed."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def alpha_for_scale(scale: float, r: int, use_rslora: bool) -> float:
    """The alpha that gives scale `scale` at rank r (inverse of lora_scale); whole numbers stay whole."""
    alpha = scale * (math.sqrt(r) if use_rslora else r)
    return float(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha


@dataclass
class LoraConfig:
    """One adapter's recipe.

    target_modules: a list matches a module whose name equals an entry or ends with "." + entry;
        a string is a regular expression that must match the whole module name; "all-linear" is
        every Linear / GPT-2 Conv1D except the output head; None picks the architecture's default.
    exclude_modules: same matching rules; these modules are never adapted.
    layers_to_transform: only modules inside these block indices (the first ".<n>." in the name,
        or the one after layers_pattern).
    rank_pattern / alpha_pattern: {module-name suffix or regex: value} overrides per module.
    bias: which biases train with the adapter ("none", "all", or those of adapted layers).
    modules_to_save: modules trained fully and saved with the adapter (e.g. a classifier head).
    init: "kaiming" (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero) or "pissa"
        (A, B from the top-r singular vectors of W0, the residual left in the base).
    use_dora: DoRA (arXiv:2402.09353): W' = m · (W0 + s·B·A) / ||W0 + s·B·A||, per output row.
    target_parameters: parameters adapted directly, as PEFT names them: an entry t picks parameter
        "<module>.<name>" when it equals t or ends with "." + t (e.g. "experts.gate_up_proj", the 3-D
        expert stack of an MoE layer; layers/experts.py). Set target_modules=[] to adapt only these.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init: str = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        if not _is_positive_int(self.r):
            _fail("r", self.r, f"the rank must be an integer from 1 to {MAX_RANK}, e.g. r=8")
        if not _is_positive_number(self.alpha):
            _fail("alpha", self.alpha, "alpha must be a finite number > 0, e.g. alpha=16 (scale = alpha/r)")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            _fail("dropout", self.dropout, "dropout must be a probability in [0, 1)")
        self._check_parameters()
        if self.target_modules == [] and self.target_parameters:
            self.target_modules = []  # only parameters are adapted (PEFT's spelling)
        else:
            self.target_modules = self._check_names("target_modules", self.target_modules)
        self.exclude_modules = self._check_names("exclude_modules", self.exclude_modules)
        self._check_layers()
        self.rank_pattern = self._check_pattern("rank_pattern", self.rank_pattern, _is_positive_int, "an integer >= 1")
        self.alpha_pattern = self._check_pattern(
            "alpha_pattern", self.alpha_pattern, _is_positive_number, "a number > 0"
        )
        if not isinstance(self.bias, str) or self.bias not in BIASES:
            _fail("bias", self.bias, f"choose one of {', '.join(BIASES)}")
        self._check_saved()
        if not isinstance(self.init, str) or self.init not in INITS:
            _fail("init", self.init, f"choose one of {', '.join(INITS)}")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "use True or False (not a string or a number)")
        if self.use_dora and self.init == "pissa":
            _fail("init", self.init, "PiSSA and DoRA cannot be combined; use init='kaiming' with use_dora=True")

    def _check_layers(self) -> None:
        layers = self.layers_to_transform
        if _is_int(layers):
            layers = [layers]
        if layers is not None and not (
            isinstance(layers, (list, tuple)) and layers and all(_is_int(i) and 0 <= i < 1 << 20 for i in layers)
        ):
            _fail("layers_to_transform", self.layers_to_transform, "give a block index or a list of indices >= 0")
        self.layers_to_transform = list(layers) if layers is not None else None
        if self.layers_pattern is not None:
            _check_regex("layers_pattern", self.layers_pattern)

    @staticmethod
    def _check_pattern(field_name: str, pattern: Any, valid, allowed: str) -> dict:
        if pattern is None:
            return {}
        if not isinstance(pattern, dict):
            _fail(field_name, pattern, "give a dict {module name or regex: value}")
        for key, value in pattern.items():
            _check_regex(field_name, key)
            if not valid(value):
                _fail(field_name, {key: value}, f"each value must be {allowed}")
        return dict(pattern)

    def _check_parameters(self) -> None:
        value = self.target_parameters
        if value is None:
            return
        if not (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(v, str) and re.fullmatch(r"[\w\-]+(\.[\w\-]+)*", v) for v in value)
        ):
            _fail(
                "target_parameters",
                value,
                "give a list of parameter names such as ['experts.gate_up_proj', 'experts.down_proj'] "
                "(dotted names, no regular expressions)",
            )
        self.target_parameters = sorted(set(value))

    def _check_saved(self) -> None:
        if self.modules_to_save is None:
            return
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if not isinstance(self.modules_to_save, (list, tuple)) or not all(
            isinstance(m, str) and m for m in self.modules_to_save
        ):
            _fail("modules_to_save", self.modules_to_save, "give a list of module names")
        self.modules_to_save = list(self.modules_to_save)

    @staticmethod
    def _check_names(field_name: str, value: Any) -> list[str] | str | None:
        if value is None:
            return None
        if isinstance(value, str):
            if value != "all-linear":
                _check_regex(field_name, value)
            return value
        if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v.strip() for v in value):
            return list(value) if not isinstance(value, set) else sorted(value)
        _fail(field_name, value, 'give a list of module names, a regular expression, or "all-linear"')
        return None  # unreachable; keeps type checkers calm

    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scale_for(self, module_name: str) -> float:
        return lora_scale(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pattern_matches(key: str, module_name: str) -> bool:
    """PEFT's rule for rank_pattern / alpha_pattern: a key applies when the name ends with it (suffix or regex)."""
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    for key, value in pattern.items():
        if pattern_matches(key, module_name):
            return value
    return default
