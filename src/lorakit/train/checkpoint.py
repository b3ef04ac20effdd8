"""Checkpoints that a run can resume from bit for bit, written so a crash never leaves half of one.

    <out>/checkpoints/step-00000040/
        adapter/                 the adapter in PEFT format (usable on its own; layout per --method: methods.py)
        trainable.safetensors    every trainable tensor, by parameter name (exact fp32 copy)
        optimizer.safetensors    AdamW moments and step counts;  optimizer.json: param groups
        rng.safetensors          each process's torch CPU (and CUDA) RNG state, for dropout
        trainer_state.json       step, epoch, scheduler state, the run's config

Which data a step sees is a function of the step number (see batches.py), so the step *is* the
data position. A checkpoint is built in a temp dir beside its final place and renamed into it;
old ones are pruned by renaming them away first (io.discard). So after a kill -9 at any point,
`step-N/` is complete or absent; only hidden leftovers remain, and the next run removes them
(`remove_leftovers`). A `step-N/` missing any of FILES (left by an older lorakit, or by hand) is
not listed as a checkpoint and is removed too.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from ..formats.peft import CONFIG_FILE, WEIGHTS_FILE
from ..io import (
    atomic_directory,
    discard,
    read_json,
    read_safetensors,
    remove_leftovers,
    write_json,
    write_safetensors,
)
from .methods import save_trained

log = logging.getLogger("lorakit.train")
FOLDER = "checkpoints"
PREFIX = "step-"
NAME = re.compile(rf"{PREFIX}(\d+)")
STATE = "trainer_state.json"
# Every file `save` writes: a folder with all of them is a checkpoint, anything less is not.
FILES = (
    f"adapter/{CONFIG_FILE}",
    f"adapter/{WEIGHTS_FILE}",
    "trainable.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "rng.safetensors",
    STATE,
)


def _step_folders(run_dir: str | os.PathLike) -> list[Path]:
    folder = Path(run_dir) / FOLDER
    found = [p for p in folder.iterdir() if NAME.fullmatch(p.name) and p.is_dir()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def complete(path: Path) -> bool:
    return all((path / name).is_file() for name in FILES)


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return [p for p in _step_folders(run_dir) if complete(p)]


def remove_stale(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what a killed run left in `run_dir` and its checkpoints/ (temp and half-deleted folders,
    incomplete step-N/ folders); return what was removed. Call it before a run writes there."""
    removed = remove_leftovers(run_dir) + remove_leftovers(Path(run_dir) / FOLDER)
    for path in _step_folders(run_dir):
        if not complete(path):
            discard(path)
            removed.append(path)
    if removed:
        log.info("removed %d leftovers of an interrupted run: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def save(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    rng_states: dict[str, list[torch.Tensor]],
    state: dict[str, Any],
    adapter_name: str = "default",
    keep: int = 2,
    method: str = "lora",
) -> Path:
    """Write checkpoint `step` (rank 0 only) and drop all but the newest `keep`."""
    target = Path(run_dir) / FOLDER / f"{PREFIX}{step:08d}"
    with atomic_directory(target) as staging:
        save_trained(model, staging / "adapter", method, adapter_name)
        trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        write_safetensors(staging / "trainable.safetensors", trainable)
        tensors, meta = _optimizer_state(optimizer)
        write_safetensors(staging / "optimizer.safetensors", tensors)
        write_json(staging / "optimizer.json", meta)
        write_safetensors(
            staging / "rng.safetensors",
            {f"{kind}.{rank}": s for kind, per_rank in rng_states.items() for rank, s in enumerate(per_rank)},
        )
        write_json(staging / STATE, {**state, "step": step, "scheduler": _jsonable(scheduler.state_dict())})
    for old in checkpoints(run_dir)[:-keep]:
        discard(old)
    return target


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "lr_lambdas"}


def load(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, rank: int) -> dict[str, Any]:
    """Restore trainable tensors, optimizer, scheduler and this process's RNG; return trainer_state."""
    state = read_json(checkpoint / STATE)
    trainable = read_safetensors(checkpoint / "trainable.safetensors")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(params):
        missing = sorted(set(params) ^ set(trainable))[:1]
        raise LorakitError(
            f"checkpoint {checkpoint} does not fit this model (first difference: {missing}); start a fresh --out"
        )
    with torch.no_grad():
        for name, value in trainable.items():
            if params[name].shape != value.shape:
                raise LorakitError(
                    f"checkpoint {checkpoint}: '{name}' has shape {tuple(value.shape)}, the model's is "
                    f"{tuple(params[name].shape)}; start a fresh --out"
                )
            params[name].copy_(value)

    meta = read_json(checkpoint / "optimizer.json")
    tensors = read_safetensors(checkpoint / "optimizer.safetensors")
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})  # moves moments to the params' device
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})

    rng = read_safetensors(checkpoint / "rng.safetensors")
    if f"cpu.{rank}" in rng:
        torch.set_rng_state(rng[f"cpu.{rank}"])
    if f"cuda.{rank}" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"])
    return state
