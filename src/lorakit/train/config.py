"""TrainConfig: everything one `lorakit train` run needs, from defaults < YAML (--config) < flags.

Every field is also a flag (`max_steps` is `--max-steps`) and a YAML key (either spelling).
Validation names the field, the value and what is allowed, so a typo in a YAML file or a flag
ends with one clear line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..config import INITS, MAX_RANK, LoraConfig
from ..errors import LorakitError
from ..io import read_yaml as read_strict_yaml
from ..prefix import INITS as PREFIX_INITS
from ..prefix import PrefixConfig
from ..quant.convert import FORMATS
from .methods import METHODS

TASKS = ("causal-lm", "seq-cls")
SCHEDULES = ("cosine", "linear", "constant")
SWITCHES = ("auto", "on", "off")
BASE_DTYPES = ("auto", *FORMATS)  # auto: fp32 for a Hugging Face folder, the blocks of a GGUF file
DEVICES = ("auto", "cpu", "cuda")
SAVED_ACTIVATIONS = ("auto", "fp32", "bf16")
MAX_COUNT = 2**31 - 1  # steps, sizes, lengths: anything larger is a typo, and int32 code paths would overflow
# Examples in one optimizer step (or one evaluation batch): a step's batch is built as a list in memory.
MAX_BATCH = 2**16
MAX_SEED = 2**32 - 1  # the range every seeded generator (random, torch, numpy) accepts
# Fields that must not change between a run and its --resume (they change what a step computes).
RESUME_FIXED = (
    "model",
    "data",
    "task",
    "r",
    "alpha",
    "targets",
    "target_parameters",
    "use_dora",
    "use_rslora",
    "init",
    "modules_to_save",
    "batch_size",
    "grad_accum",
    "seed",
    "max_length",
    "labels",
    "base_dtype",
    "method",
    "prefix_tokens",
    "prefix_projection",
    "prefix_init",
    "prefix_init_text",
)


def _fail(name: str, value: Any, allowed: str) -> None:
    flag = "--" + name.replace("_", "-")
    raise LorakitError(f"{name}={value!r} is invalid ({flag}): {allowed}")


@dataclass
class TrainConfig:
    """One training run. Paths are strings; lists may also be given as comma-separated strings."""

    model: str = ""
    data: str = ""
    out: str = ""
    task: str = "causal-lm"
    eval_data: str | None = None
    eval_fraction: float | None = None
    # what is trained (train/methods.py): a LoRA adapter, a prefix (prefix tuning), or both
    method: str = "lora"
    prefix_tokens: int = 20  # virtual tokens per layer of the prefix
    prefix_projection: bool = False  # train the prefix through PEFT's MLP reparameterisation
    # how the prefix starts (lorakit/prefix_init.py): "tokens" = the model's keys/values of prefix_init_text
    # (None: prefix_init.DEFAULT_TEXT, task-neutral); "random" = PEFT's N(0, 1) default; "zero"
    prefix_init: str = "tokens"
    prefix_init_text: str | None = None
    # LoRA (mirrors lorakit.LoraConfig; targets=None picks the architecture's default)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str | None = None
    target_parameters: list[str] | None = None  # 3-D expert stacks etc., as LoraConfig.target_parameters
    exclude: list[str] | None = None
    modules_to_save: list[str] | None = None
    init: str = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    # optimisation
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    # Defaults from the sweep in docs/default-rates (report.md: command, tables, the rule that chose them;
    # tests/train/test_train_config.py keeps these equal to its results.json). One rate for both task kinds: 3e-3
    # had the smallest worst gap to each task's best of every setting swept, on causal-lm and on seq-cls;
    # 1e-3 was 3-31% off every causal task, 1e-2 149% off the demo's and collapsed two seq-cls tasks; a head
    # (a new classifier) trained as well at the adapter's rate as at 1e-2 or 3e-2: no rate of its own.
    lr: float = 3e-3
    head_lr: float | None = None  # saved / new heads (modules_to_save); None: the same as lr
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    max_length: int = 512
    seed: int = 0
    labels: list[str] | None = None
    # memory / precision
    gradient_checkpointing: bool = False
    checkpoint_layers: float = 1.0  # share of the decoder layers checkpointed, evenly spread (with the flag above)
    bf16: str = "auto"
    base_dtype: str = "auto"
    saved_activations: str = "auto"  # auto: bf16 when the base is quantized or 16-bit, else fp32
    device: str = "auto"
    # evaluation, checkpoints, output
    eval_every: int = 0
    eval_batch_size: int | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        for name in ("model", "data", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail(name, getattr(self, name), "required; give a path" + (" or hub id" if name == "model" else ""))
        if self.eval_data is not None and (not isinstance(self.eval_data, str) or not self.eval_data):
            _fail("eval_data", self.eval_data, "give a path to a held-out data file")
        if self.task not in TASKS:
            _fail("task", self.task, f"choose {' or '.join(TASKS)}")
        if self.method not in METHODS:
            _fail("method", self.method, f"choose one of {', '.join(METHODS)}")
        if self.method != "lora" and self.task != "causal-lm":
            _fail("method", self.method, "prefix tuning is trained for --task causal-lm only; use --method lora")
        if self.eval_fraction is not None and not (
            isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1
        ):
            _fail("eval_fraction", self.eval_fraction, "give a fraction between 0 and 1, e.g. 0.1")
        if self.eval_data and self.eval_fraction:
            _fail("eval_fraction", self.eval_fraction, "give either --eval-data or --eval-fraction, not both")
        for name in _LIST_HELP:
            setattr(self, name, _list_field(name, getattr(self, name)))
        if isinstance(self.targets, list) and len(self.targets) == 1 and self.targets[0] == "all-linear":
            self.targets = "all-linear"
        self._check_int("r", 1, "the rank must be an integer >= 1, e.g. --r 8", MAX_RANK)
        self._check_number("alpha", lambda v: v > 0, "alpha must be a number > 0, e.g. --alpha 16 (scale = alpha/r)")
        self._check_number("dropout", lambda v: 0 <= v < 1, "dropout must be a probability in [0, 1)")
        if self.init not in INITS:
            _fail("init", self.init, f"choose one of {', '.join(INITS)}")
        if self.max_steps is not None:
            self._check_int("max_steps", 1, "give a number of optimizer steps >= 1")
        if self.epochs is not None:
            self._check_number("epochs", lambda v: v > 0, "give a number of passes over the data > 0, e.g. 1 or 0.5")
        if self.max_steps is not None and self.epochs is not None:
            _fail("epochs", self.epochs, "give either --max-steps or --epochs, not both")
        for name, low in (
            ("batch_size", 1),
            ("grad_accum", 1),
            ("warmup_steps", 0),
            ("max_length", 2),
            ("eval_every", 0),
            ("save_every", 0),
            ("keep_checkpoints", 1),
            ("log_every", 1),
        ):
            self._check_int(name, low, f"give an integer >= {low}")
        self._check_int("prefix_tokens", 1, "give a number of virtual tokens >= 1, e.g. 20", 2**16)
        if self.prefix_init not in PREFIX_INITS:
            _fail("prefix_init", self.prefix_init, f"choose one of {', '.join(PREFIX_INITS)}")
        text = self.prefix_init_text
        if text is not None and (not isinstance(text, str) or not text.strip()):
            _fail("prefix_init_text", text, "give a non-empty text (its tokens start the prefix)")
        if text is not None and self.prefix_init != "tokens":
            _fail("prefix_init_text", text, "goes with --prefix-init tokens")
        self._check_int("seed", 0, "give an integer >= 0", MAX_SEED)
        if self.batch_size * self.grad_accum > MAX_BATCH:
            _fail("batch_size", self.batch_size, f"batch_size x grad_accum may be at most {MAX_BATCH:,} a step")
        if self.eval_batch_size is not None:
            self._check_int("eval_batch_size", 1, "give an integer >= 1", MAX_BATCH)
        self._check_number("lr", lambda v: 0 < v < 1, "give a learning rate > 0 and < 1, e.g. --lr 3e-3")
        if self.head_lr is not None:
            self._check_number("head_lr", lambda v: 0 < v < 1, "give a learning rate > 0 and < 1, e.g. --head-lr 3e-3")
        self._check_number("weight_decay", lambda v: v >= 0, "give a number >= 0")
        self._check_number(
            "checkpoint_layers", lambda v: 0 < v <= 1, "give the share of layers to checkpoint, > 0 and <= 1, e.g. 0.5"
        )
        self._check_number("max_grad_norm", lambda v: v >= 0, "give a number >= 0 (0 turns clipping off)")
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("bf16", SWITCHES),
            ("base_dtype", BASE_DTYPES),
            ("saved_activations", SAVED_ACTIVATIONS),
            ("device", DEVICES),
        ):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"choose one of {', '.join(allowed)}")
        for name in (
            "use_rslora",
            "use_dora",
            "prefix_projection",
            "gradient_checkpointing",
            "resume",
            "overwrite",
            "progress",
            "plot",
        ):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "use true or false")
        if self.use_dora and self.init == "pissa":
            _fail("init", self.init, "PiSSA and DoRA cannot be combined; use --init kaiming with --use-dora")
        self.lora_config()  # the adapter's own rules (e.g. valid regexes), checked before any model is loaded

    def _check_int(self, name: str, low: int, allowed: str, high: int = MAX_COUNT) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            _fail(name, value, f"{allowed} (at most {high:,})")

    def _check_number(self, name: str, ok, allowed: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            _fail(name, value, allowed)

    # ----- derived ----------------------------------------------------------------------------
    def lora_config(self, default_modules_to_save: list[str] | None = None) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            alpha=float(self.alpha),
            dropout=float(self.dropout),
            target_modules=self.targets,
            target_parameters=self.target_parameters,
            exclude_modules=self.exclude,
            modules_to_save=self.modules_to_save or default_modules_to_save,
            init=self.init,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
        )

    def prefix_config(self, tokenizer=None) -> PrefixConfig:
        """The prefix to train; init "tokens" needs the tokenizer to encode prefix_init_text."""
        ids = None
        if self.prefix_init == "tokens":
            from ..prefix_init import DEFAULT_TEXT, prefix_token_ids

            ids = prefix_token_ids(tokenizer, self.prefix_init_text or DEFAULT_TEXT, self.prefix_tokens)
        return PrefixConfig(
            num_virtual_tokens=self.prefix_tokens,
            prefix_projection=self.prefix_projection,
            init=self.prefix_init,
            token_ids=ids,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Defaults, then the YAML file's keys, then `overrides` (flags the user gave, None = not given)."""
        values: dict[str, Any] = {}
        if yaml_path:
            values.update(read_yaml(yaml_path))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**values)


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


_REGEX_CHARS = "*+?[](){}|^$\\"
_LIST_HELP = {
    "targets": "give comma-separated module names, a regex or all-linear, e.g. --targets q_proj,v_proj",
    "target_parameters": "give comma-separated parameter names, e.g. --target-parameters experts.gate_up_proj",
    "exclude": "give comma-separated module names, e.g. --exclude lm_head",
    "modules_to_save": "give comma-separated module names, e.g. --modules-to-save score",
    "labels": "give two or more distinct class labels, e.g. --labels negative,positive",
}


def _list_field(name: str, value: Any) -> Any:
    """None (not given) stays None; "a,b" -> ["a", "b"]; for targets a regex or "all-linear" stays a
    string. Given but naming nothing (",", [], a number, a nested list) is refused, never read as "not given"."""
    if value is None:
        return None
    if isinstance(value, str):
        if name == "targets" and (value == "all-linear" or any(c in value for c in _REGEX_CHARS)):
            return value
        items = [p.strip() for p in value.split(",") if p.strip()]
    else:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
    valid = (lambda v: isinstance(v, str) and v.strip()) if name != "labels" else is_label
    if not items or not all(valid(v) for v in items) or (name == "labels" and len(set(items)) < len(items)):
        _fail(name, value, _LIST_HELP[name])
    return items


def is_label(value: Any) -> bool:
    """A class label: a non-blank string or an integer (not a bool)."""
    return (isinstance(value, str) and bool(value.strip())) or (isinstance(value, int) and not isinstance(value, bool))


def read_yaml(path: str) -> dict[str, Any]:
    """The settings of a --config file (strict YAML: see lorakit.io.read_yaml), keys checked against the fields."""
    what = f"--config {path}"
    loaded = read_strict_yaml(path, what)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise LorakitError(f"{what} must hold a mapping of settings (key: value), not a {type(loaded).__name__}")
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if not isinstance(key, str) or name not in FIELD_NAMES:
            raise LorakitError(f"{what}: unknown setting {key!r}; known settings: {', '.join(FIELD_NAMES)}")
        if name in values:
            raise LorakitError(f"{what}: {key!r} sets {name} a second time; keep one of them")
        values[name] = value
    return values
