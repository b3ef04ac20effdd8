"""What a run is made of before its first step: the model with a fresh adapter, the optimizer's
parameter groups, the learning-rate schedule, precision, and the checks on --out and --resume."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from ..inject import inject
from ..io import discard
from ..layers.saved_module import SavedModule
from ..models import load_model
from ..prefix import add_prefix
from ..quant import is_quantized
from ..quant.activations import store_activations
from . import checkpoint, distributed
from .config import RESUME_FIXED, TrainConfig
from .methods import PREFIX_NAME, trains

log = logging.getLogger("lorakit.train")
ADAPTER = "default"
CLASSIFIER_HEADS = ("pre_classifier", "classifier", "score")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for 0-based `step`: linear warmup from 0, then decay to 0
    (the same numbers as transformers' get_{cosine,linear,constant}_schedule_with_warmup)."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def classifier_heads(model: nn.Module) -> list[str]:
    heads = [name for name, _ in model.named_children() if name in CLASSIFIER_HEADS]
    if not heads:
        raise LorakitError(
            f"{type(model).__name__} has no classifier head named {' or '.join(CLASSIFIER_HEADS)}; name it with "
            "--modules-to-save"
        )
    return heads


def check_out(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to overwrite a run by accident."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is a file; give a directory for the run")
    found = checkpoint.checkpoints(out)
    if cfg.resume:
        if not found:
            log.info("--resume: no checkpoint in %s yet, starting from step 0", out / checkpoint.FOLDER)
        return found[-1] if found else None
    if (found or (out / "adapter").exists()) and not cfg.overwrite:
        raise LorakitError(
            f"--out {out} already holds a run; pass --resume to continue it, --overwrite to replace it, or pick "
            "another --out"
        )
    return None


def clear_out(cfg: TrainConfig) -> None:
    """Rank 0, once every process has checked --out: remove a killed run's leftovers, and with
    --overwrite (and no --resume) the previous run's checkpoints and adapter."""
    out = Path(cfg.out)
    checkpoint.remove_stale(out)
    if not cfg.resume and cfg.overwrite:
        for stale in (out / checkpoint.FOLDER, out / "adapter"):
            discard(stale)


def check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # keys older runs did not record
    for key in RESUME_FIXED:
        before, now = saved.get(key, defaults[key]), getattr(cfg, key)
        if before != now:
            raise LorakitError(
                f"--resume: {key} was {before!r} in {path} but is {now!r} now; use the same setting or a fresh --out"
            )


def autocast_for(cfg: TrainConfig, device: torch.device):
    if cfg.base_dtype not in ("auto", "fp32"):
        return contextlib.nullcontext  # a quantized / 16-bit base picks its own arithmetic (lorakit.quant)
    wanted = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not wanted:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def rng_states(dist: distributed.Dist) -> dict[str, list[torch.Tensor]]:
    states = {"cpu": dist.gather_tensors(torch.get_rng_state())}
    if dist.device.type == "cuda":
        states["cuda"] = dist.gather_tensors(torch.cuda.get_rng_state(dist.device))
    return states


def build_model(cfg: TrainConfig, tokenizer, labels: list | None) -> nn.Module:
    """The base model for the task, with a fresh adapter and / or prefix (--method), trainable, and everything
    else frozen."""
    torch.manual_seed(cfg.seed)  # a new classifier head starts the same in every process and run
    extra: dict[str, Any] = {}
    if labels is not None:
        extra = {
            "id2label": {i: str(v) for i, v in enumerate(labels)},
            "label2id": {str(v): i for i, v in enumerate(labels)},
            "ignore_mismatched_sizes": True,
        }
    model = load_model(
        cfg.model, task=cfg.task, num_labels=len(labels) if labels else None, base_dtype=cfg.base_dtype, **extra
    )
    if cfg.task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # Llama-style classifiers find the last token by it
    heads = classifier_heads(model) if cfg.task == "seq-cls" and not cfg.modules_to_save else None
    if trains(cfg.method, "lora"):
        inject(model, cfg.lora_config(default_modules_to_save=heads), name=ADAPTER, seed=cfg.seed)
    else:
        model.requires_grad_(False)  # what inject does for LoRA: only the prefix trains
    if trains(cfg.method, "prefix"):
        add_prefix(model, cfg.prefix_config(tokenizer), name=PREFIX_NAME, seed=cfg.seed)
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise LorakitError(
                f"{type(model).__name__} does not support gradient checkpointing; drop --gradient-checkpointing"
            )
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if cfg.checkpoint_layers < 1:
            checkpoint_share(model, cfg.checkpoint_layers)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # training never reads a KV cache; building one holds every layer's k, v
    saved = cfg.saved_activations
    if saved == "auto":
        saved = "bf16" if any(is_quantized(m) for m in model.modules()) else "fp32"
    store_activations(model, torch.bfloat16 if saved == "bf16" else None)
    if saved == "bf16":
        log.info("activations saved for backward are stored in bf16 (compute stays fp32)")
    return model


def checkpoint_share(model: nn.Module, share: float) -> None:
    """Keep checkpointing on for `share` of the checkpointable layers, evenly spread (layer i is on when
    floor((i+1)·share) > floor(i·share)): memory and recompute time both scale with the share."""
    layers = [m for m in model.modules() if any(c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = math.floor((i + 1) * share) > math.floor(i * share)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The adapter's tensors at --lr; fully trained copies of saved / new heads at --head-lr (if given)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.head_lr is None:
        return [{"params": trainable}]
    heads = {id(p) for m in model.modules() if isinstance(m, SavedModule) for p in m.copies.parameters()}
    groups = [
        {"params": [p for p in trainable if id(p) not in heads]},
        {"params": [p for p in trainable if id(p) in heads], "lr": cfg.head_lr},
    ]
    return [g for g in groups if g["params"]]
