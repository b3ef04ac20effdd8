"""PEFT's prefix-tuning layout, read and written: adapter_config.json + adapter_model.safetensors.

    adapter_config.json        peft_type "PREFIX_TUNING", num_virtual_tokens n, num_layers L,
                               token_dim D, num_attention_heads (key/value heads), prefix_projection, ...
    adapter_model.safetensors  prompt_embeddings (n x L·2·D): the prefix P itself

PEFT saves P, never the reparameterisation MLP (which only helps training), so a loaded prefix is
the plain table, whatever prefix_projection says. Loading checks the whole file against the model
(shape, heads, finite values) before anything changes, then attaches the prefix in one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from ..io import read_json, read_safetensors, write_json, write_safetensors
from ..prefix import (
    PrefixConfig,
    PrefixEncoder,
    PrefixShape,
    attach_encoder,
    check_new_prefix_name,
    prefix_shape,
    prefixes,
    require_prefix,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TYPE = "PREFIX_TUNING"
TABLE_KEY = "prompt_embeddings"
_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
)


@dataclass
class PrefixFile:
    """A parsed prefix adapter: its config, the table P, and the model shape it was made for."""

    config: PrefixConfig
    table: Tensor
    shape: PrefixShape
    source: str  # where it came from, for messages


def _task_type(model: nn.Module) -> str:
    name = type(model).__name__
    return next((task for suffix, task in _TASKS if name.endswith(suffix)), "FEATURE_EXTRACTION")


def prefix_state(model: nn.Module, name: str) -> tuple[dict[str, Tensor], dict]:
    """The tensors and adapter_config.json contents of prefix `name`, as PEFT writes them."""
    require_prefix(model, name)
    encoder = prefixes(model).encoders[name]
    config, shape = encoder.config, encoder.shape
    with torch.no_grad():
        table = encoder.table().detach().float()
    peft_config = {
        "peft_type": PEFT_TYPE,
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "auto_mapping": None,
        "inference_mode": True,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": shape.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": shape.num_heads,
        "num_layers": shape.num_layers,
        "encoder_hidden_size": config.encoder_hidden_size or shape.token_dim,
        "prefix_projection": config.prefix_projection,
        "init_weights": "zero" if config.init == "zero" else None,
        "modules_to_save": None,
    }
    return {TABLE_KEY: table}, peft_config


def save_prefix(model: nn.Module, directory: str | Path, name: str = "prefix") -> Path:
    """Write prefix `name` in PEFT's PREFIX_TUNING layout (PeftModel.from_pretrained reads it)."""
    tensors, peft_config = prefix_state(model, name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LorakitError(f"{directory} exists and is not a directory; choose another output path")
    write_safetensors(directory / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, peft_config)
    return directory


# ----- reading ------------------------------------------------------------------------------------
def _int(config: dict, key: str, where: str, low: int = 1) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LorakitError(f"{where}: {key}={value!r} is invalid; a prefix adapter needs an integer >= {low}")
    return value


def parse_prefix(peft_config: dict, tensors: dict[str, Tensor], where: str) -> PrefixFile:
    """Check a PREFIX_TUNING config and its tensors against each other (not yet against a model)."""
    if peft_config.get("peft_type") != PEFT_TYPE:
        raise LorakitError(f"{where}: peft_type={peft_config.get('peft_type')!r}, not {PEFT_TYPE!r}")
    submodules = peft_config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise LorakitError(
            f"{where}: num_transformer_submodules={submodules!r} is an encoder-decoder prefix; lorakit's prefix "
            "tuning supports decoders and encoders (1)"
        )
    layers, token_dim, heads = (_int(peft_config, k, where) for k in ("num_layers", "token_dim", "num_attention_heads"))
    if token_dim % heads:
        raise LorakitError(f"{where}: token_dim={token_dim} is not a multiple of num_attention_heads={heads}")
    shape = PrefixShape(num_layers=layers, num_heads=heads, head_dim=token_dim // heads)
    try:
        config = PrefixConfig(
            num_virtual_tokens=_int(peft_config, "num_virtual_tokens", where),
            prefix_projection=bool(peft_config.get("prefix_projection", False)),
            encoder_hidden_size=peft_config.get("encoder_hidden_size"),
            init="zero" if peft_config.get("init_weights") == "zero" else "random",
        )
    except LorakitError as err:
        raise LorakitError(f"{where}: {err}") from None
    extra = sorted(k for k in tensors if k != TABLE_KEY)
    if extra:
        raise LorakitError(
            f"{where} holds '{extra[0]}' besides the prefix (e.g. a classifier head trained with it); lorakit loads "
            f"prefix adapters holding only '{TABLE_KEY}'"
        )
    table = tensors.get(TABLE_KEY)
    if table is None:
        raise LorakitError(f"{where} has no '{TABLE_KEY}' tensor; it is not a complete prefix adapter")
    expected = (config.num_virtual_tokens, shape.width)
    if tuple(table.shape) != expected:
        raise LorakitError(
            f"{where}: '{TABLE_KEY}' has shape {tuple(table.shape)} but its config says {expected} "
            "(num_virtual_tokens x num_layers·2·token_dim); the file and its config disagree"
        )
    if not table.is_floating_point() or not bool(torch.isfinite(table).all()):
        raise LorakitError(f"{where}: '{TABLE_KEY}' must hold finite floating-point numbers; the file is corrupt")
    return PrefixFile(config, table, shape, where)


def is_prefix_folder(directory: str | Path) -> bool:
    """Whether `directory` holds a PEFT adapter_config.json saying peft_type PREFIX_TUNING."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    config = read_json(path)
    return isinstance(config, dict) and config.get("peft_type") == PEFT_TYPE


def read_prefix_file(directory: str | Path) -> PrefixFile:
    directory = Path(directory)
    if not directory.is_dir():
        raise LorakitError(f"adapter directory {directory} does not exist; give the folder holding {CONFIG_FILE}")
    peft_config = read_json(directory / CONFIG_FILE)
    if not isinstance(peft_config, dict):
        raise LorakitError(f"{directory / CONFIG_FILE} must hold a JSON object")
    return parse_prefix(peft_config, read_safetensors(directory / WEIGHTS_FILE), str(directory))


def plan_prefix(model: nn.Module, file: PrefixFile, name: str) -> PrefixEncoder:
    """The encoder to attach, after checking the file against `model`; the model is not touched."""
    check_new_prefix_name(model, name)
    own = prefix_shape(model)
    if file.shape != own:
        have, need = file.shape, own
        raise LorakitError(
            f"{file.source} is a prefix for {have.num_layers} layers x {have.num_heads} key/value heads x "
            f"{have.head_dim} but this model has {need.num_layers} x {need.num_heads} x {need.head_dim}; "
            "the adapter is for another model"
        )
    return PrefixEncoder(file.config, own, table=file.table)


def apply_prefix(
    model: nn.Module,
    name: str,
    encoder: PrefixEncoder,
    trainable: bool = False,
    freeze: bool = True,
    activate: bool = True,
) -> None:
    """Attach a planned prefix. trainable=True freezes everything else and trains it; otherwise
    freeze=True freezes the whole model (PEFT's inference mode) and freeze=False only the prefix."""
    if trainable or freeze:
        model.requires_grad_(False)
    encoder.requires_grad_(trainable)
    attach_encoder(model, name, encoder, activate=activate)


def load_prefix(
    model: nn.Module,
    directory: str | Path,
    name: str = "prefix",
    trainable: bool = False,
    activate: bool = True,
    freeze: bool = True,
) -> nn.Module:
    """Add the PREFIX_TUNING adapter in `directory` (saved by lorakit or PEFT) as prefix `name`."""
    encoder = plan_prefix(model, read_prefix_file(directory), name)
    apply_prefix(model, name, encoder, trainable=trainable, freeze=freeze, activate=activate)
    return model
