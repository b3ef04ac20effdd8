"""What several subcommands share: loading a base model for the adapters a user names.

An adapter directory written by `lorakit train` carries run.json (task, class labels); one
written by PEFT has only adapter_config.json, whose task_type and saved head give the same.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ..errors import LorakitError
from ..formats import read_adapter
from ..formats.peft import CONFIG_FILE
from ..formats.peft_prefix import is_prefix_folder
from ..io import read_json
from ..model_state import new_weights, saved_modules
from ..models import load_model, load_tokenizer
from ..train.config import BASE_DTYPES, TASKS, is_label
from ..train.methods import load_trained

RUN_FILE = "run.json"  # what `lorakit train` records beside the adapter (task, labels, base model)
_HEAD_WEIGHT = re.compile(r"\.(score|classifier|classifier\.out_proj)\.weight$")


def add_model_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--model",
        required=required,
        metavar="PATH_OR_ID",
        help="a Hugging Face model folder, a hub id, or smollm2-135m-instruct (the offline SmolLM2)",
    )


def add_base_dtype_argument(parser, default: str | None = "auto") -> None:
    """--base-dtype: how the frozen base is stored (adapters stay fp32); lorakit.quant picks the arithmetic."""
    parser.add_argument(
        "--base-dtype",
        choices=BASE_DTYPES,
        default=default,
        help="store the frozen base as fp32, bf16, fp16, int8 or int4 (embeddings and head int8); adapters stay "
        "fp32. auto (default): fp32 for a Hugging Face folder, the file's own blocks for a GGUF file",
    )


def adapter_info(directory: str) -> dict[str, Any]:
    """{"task", "labels", "base_model"} of an adapter directory, from run.json or adapter_config.json."""
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file():
        raise LorakitError(
            f"--adapter {directory} is not an adapter directory (no {CONFIG_FILE}); give the folder `lorakit train` "
            "wrote, e.g. RUN/adapter"
        )
    info = run_record(path / RUN_FILE) if (path / RUN_FILE).exists() else {}
    if not info.get("task") and is_prefix_folder(path):  # PEFT's prefix folder: no tensors to look at
        info["task"] = "seq-cls" if read_json(path / CONFIG_FILE).get("task_type") == "SEQ_CLS" else "causal-lm"
    if not info.get("task"):
        config, tensors = read_adapter(path)
        info["task"] = "seq-cls" if config.get("task_type") == "SEQ_CLS" else "causal-lm"
        info["base_model"] = config.get("base_model_name_or_path")
        if info["task"] == "seq-cls":
            heads = [t for k, t in tensors.items() if _HEAD_WEIGHT.search(k)]
            info["labels"] = list(range(heads[0].shape[0])) if heads else None
    return info


def run_record(path: Path) -> dict[str, Any]:
    """{"task", "labels", "base_model"} from the run.json `lorakit train` writes beside an adapter, checked:
    it decides which model class and head the adapter is loaded into."""
    run = read_json(path)
    fix = f"fix {path} or delete it (adapter_config.json alone is enough)"
    if not isinstance(run, dict):
        raise LorakitError(f"{path} must hold a JSON object, not a {type(run).__name__}; {fix}")
    task, labels, model = run.get("task"), run.get("labels"), run.get("model")
    if task is not None and task not in TASKS:
        raise LorakitError(f"{path}: task {task!r} is not one of {', '.join(TASKS)}; {fix}")
    if labels is not None and not (isinstance(labels, list) and len(labels) >= 2 and all(map(is_label, labels))):
        raise LorakitError(f"{path}: labels {labels!r} are not a list of two or more class labels; {fix}")
    if model is not None and not isinstance(model, str):
        raise LorakitError(f"{path}: model {model!r} is not a path or hub id; {fix}")
    return {"task": task, "labels": labels, "base_model": model}


def load_with_adapters(
    model_id: str,
    adapters: list[str],
    task: str | None = None,
    names: list[str] | None = None,
    base_dtype: str | None = None,
) -> tuple[Any, Any, str, list | None]:
    """(model, tokenizer, task, labels) with each adapter loaded (the last one active); eval mode."""
    infos = [adapter_info(a) for a in adapters]
    tasks = {i["task"] for i in infos}
    if task is None:
        task = infos[0]["task"] if infos else "causal-lm"
    if tasks and tasks != {task}:
        raise LorakitError(
            f"the adapters are for {', '.join(sorted(tasks))} but --task is {task}; drop --task or pick matching "
            "adapters"
        )
    labels = next((i["labels"] for i in infos if i.get("labels")), None)
    extra: dict[str, Any] = {}
    if task == "seq-cls" and labels:
        extra = {
            "num_labels": len(labels),
            "id2label": {i: str(v) for i, v in enumerate(labels)},
            "label2id": {str(v): i for i, v in enumerate(labels)},
            "ignore_mismatched_sizes": True,
        }
    tokenizer = load_tokenizer(model_id)
    model = load_model(model_id, task=task, base_dtype=base_dtype, **extra)
    if task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    for i, directory in enumerate(adapters):
        name = names[i] if names else ("default" if len(adapters) == 1 else f"adapter{i + 1}")
        load_trained(model, directory, name)
    if task == "seq-cls" and adapters:  # without one, eval scores the base as it is (a baseline)
        require_trained(model, model_id, adapters)
    return model.eval(), tokenizer, task, labels


def require_trained(model, model_id: str, adapters: list[str]) -> None:
    """Every weight the loader started at random (a new classifier head) must come from the adapters
    (their modules_to_save); else the outputs would be noise and a merge would save an untrained head."""
    saved = [path for path, _ in saved_modules(model)]
    untrained = [w for w in new_weights(model) if not any(w.startswith(f"{s}.") for s in saved)]
    if untrained:
        raise LorakitError(
            f"--adapter {adapters[0]} is for sequence classification but neither it nor --model {model_id} holds a "
            f"trained classifier head ({untrained[0]} would be random); give the base model the adapter was trained "
            "on, or an adapter saved with its head (modules_to_save)"
        )


def quiet_transformers() -> None:
    """No per-shard "Loading weights" bars or advisory warnings in command output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
