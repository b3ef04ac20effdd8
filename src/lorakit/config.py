"""LoraConfig: what to adapt and how.

An adapter adds ΔW = s·B·A to each targeted weight W0 (d x k), with A (r x k), B (d x r) and
s = alpha / r (or alpha / sqrt(r) with rsLoRA, which keeps the update's scale steady as r grows).
Field names follow PEFT where PEFT has the concept, so its adapter_config.json maps one to one.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import LorakitError

INITS = ("kaiming", "gaussian", "pissa")
BIASES = ("none", "all", "lora_only")


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise LorakitError(f"LoraConfig.{field_name}={value!r} is invalid: {allowed}")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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

    def __post_init__(self) -> None:
        if not _is_positive_int(self.r):
            _fail("r", self.r, "the rank must be an integer >= 1, e.g. r=8")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            _fail("alpha", self.alpha, "alpha must be a number > 0, e.g. alpha=16 (scale = alpha/r)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            _fail("dropout", self.dropout, "dropout must be a probability in [0, 1)")
        self.target_modules = self._check_names("target_modules", self.target_modules)
        self.exclude_modules = self._check_names("exclude_modules", self.exclude_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and not (
            isinstance(self.layers_to_transform, (list, tuple))
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform)
        ):
            _fail("layers_to_transform", self.layers_to_transform, "give a block index or a list of indices >= 0")
        if self.layers_to_transform is not None:
            self.layers_to_transform = list(self.layers_to_transform)
        for key, value in dict(self.rank_pattern).items():
            if not _is_positive_int(value):
                _fail("rank_pattern", {key: value}, "each rank must be an integer >= 1")
        for key, value in dict(self.alpha_pattern).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                _fail("alpha_pattern", {key: value}, "each alpha must be a number > 0")
        if self.bias not in BIASES:
            _fail("bias", self.bias, f"choose one of {', '.join(BIASES)}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not all(isinstance(m, str) and m for m in self.modules_to_save):
                _fail("modules_to_save", self.modules_to_save, "give a list of module names")
            self.modules_to_save = list(self.modules_to_save)
        if self.init not in INITS:
            _fail("init", self.init, f"choose one of {', '.join(INITS)}")
        if not isinstance(self.use_rslora, bool):
            _fail("use_rslora", self.use_rslora, "use True or False")
        if not isinstance(self.use_dora, bool):
            _fail("use_dora", self.use_dora, "use True or False")
        if self.use_dora and self.init == "pissa":
            _fail("init", self.init, "PiSSA and DoRA cannot be combined; use init='kaiming' with use_dora=True")

    @staticmethod
    def _check_names(field_name: str, value: Any) -> list[str] | str | None:
        if value is None:
            return None
        if isinstance(value, str):
            if value != "all-linear":
                try:
                    re.compile(value)
                except re.error as err:
                    _fail(field_name, value, f"a string is a regular expression and this one does not compile ({err})")
            return value
        if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
            return list(value) if not isinstance(value, set) else sorted(value)
        _fail(field_name, value, 'give a list of module names, a regular expression, or "all-linear"')
        return None  # unreachable; keeps type checkers calm

    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scale_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / r**0.5 if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rule: a key applies when module_name ends with it (as a dotted suffix or regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
