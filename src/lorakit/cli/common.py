"""What several subcommands share: loading a base model for the adapters a user names.

An adapter directory written by `lorakit train` carries run.json (task, class labels); one
written by PEFT has only adapter_config.json, whose task_type and saved head give the same.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from ..errors import LorakitError
from ..formats import read_adapter
from ..formats.peft import CONFIG_FILE
from ..models import load_model, load_tokenizer
from ..quant.convert import FORMATS

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
        choices=["auto", *FORMATS],
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
    info: dict[str, Any] = {}
    if (path / "run.json").is_file():
        try:
            run = json.loads((path / "run.json").read_text())
            info = {"task": run.get("task"), "labels": run.get("labels"), "base_model": run.get("model")}
        except json.JSONDecodeError:
            info = {}
    if not info.get("task"):
        config, tensors = read_adapter(path)
        info["task"] = "seq-cls" if config.get("task_type") == "SEQ_CLS" else "causal-lm"
        info["base_model"] = config.get("base_model_name_or_path")
        if info["task"] == "seq-cls":
            heads = [t for k, t in tensors.items() if _HEAD_WEIGHT.search(k)]
            info["labels"] = list(range(heads[0].shape[0])) if heads else None
    return info


def load_with_adapters(
    model_id: str,
    adapters: list[str],
    task: str | None = None,
    names: list[str] | None = None,
    base_dtype: str | None = None,
) -> tuple[Any, Any, str, list | None]:
    """(model, tokenizer, task, labels) with each adapter loaded (the last one active); eval mode."""
    import lorakit

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
        lorakit.load_adapter(model, directory, name=name)
    return model.eval(), tokenizer, task, labels


def quiet_transformers() -> None:
    """No per-shard "Loading weights" bars or advisory warnings in command output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
