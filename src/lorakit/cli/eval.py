"""`lorakit eval`: held-out loss and perplexity (causal LM) or accuracy (classification) of a model + adapter."""

from __future__ import annotations

import argparse
import json

from ..train.config import DEVICES, TASKS
from .common import add_base_dtype_argument, add_model_argument, load_with_adapters, quiet_transformers


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="loss/perplexity or accuracy of a model (+ adapter) on a data file",
        description=__doc__ + "\n\nThe data file has the same columns as for `lorakit train`.",
    )
    add_model_argument(p)
    p.add_argument(
        "--adapter", metavar="DIR", help="adapter folder (e.g. RUN/adapter); without it the base model is scored"
    )
    p.add_argument("--data", required=True, metavar="FILE", help=".jsonl/.json/.csv/.txt with the training columns")
    p.add_argument("--task", choices=TASKS, help="default: the adapter's task, else causal-lm")
    p.add_argument("--batch-size", type=int, default=16, metavar="N")
    p.add_argument("--max-length", type=int, default=512, metavar="N")
    p.add_argument("--device", choices=DEVICES, default="auto")
    add_base_dtype_argument(p)
    p.add_argument("--json", action="store_true", help='print one JSON object, e.g. {"loss": 2.31, "perplexity": 10.1}')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import LorakitError
    from ..train.data import encode, label_set, load_rows
    from ..train.distributed import pick_device
    from ..train.objective import evaluate

    if args.batch_size < 1 or args.max_length < 2:
        raise LorakitError("--batch-size must be >= 1 and --max-length >= 2")
    quiet_transformers()
    rows = load_rows(args.data, "--data")
    model, tokenizer, task, labels = load_with_adapters(
        args.model, [args.adapter] if args.adapter else [], args.task, base_dtype=args.base_dtype
    )
    if task == "seq-cls" and labels is None:
        labels = label_set(rows, args.data)
        if len(labels) != model.config.num_labels:
            raise LorakitError(
                f"--data has {len(labels)} labels but the model's head has {model.config.num_labels}; give the "
                "adapter trained for them"
            )
    examples, _ = encode(rows, tokenizer, task, args.max_length, labels, args.data)
    device = pick_device(args.device)
    metrics = evaluate(model.to(device), examples, task, args.batch_size, tokenizer.pad_token_id, device)
    if task == "seq-cls":
        metrics = {"accuracy": metrics["accuracy"], "loss": metrics["loss"]}
    metrics = {k: round(v, 6) for k, v in metrics.items()}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{len(examples)} examples: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0
