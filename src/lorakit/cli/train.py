"""`lorakit train`: fine-tune a LoRA adapter on a local data file; the same command runs under torchrun.

Writes OUT/adapter/ (PEFT layout + run.json), OUT/metrics.jsonl, OUT/loss.png, OUT/run.json and
OUT/checkpoints/. Settings come from defaults, then --config run.yaml, then the flags given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..config import INITS
from ..prefix import INITS as PREFIX_INITS
from ..train.config import DEVICES, SAVED_ACTIVATIONS, SCHEDULES, SWITCHES, TASKS
from ..train.methods import METHODS
from .common import add_base_dtype_argument, add_model_argument, quiet_transformers

EXAMPLES = """examples:
  lorakit train --model smollm2-135m-instruct --data train.jsonl --eval-fraction 0.1 --out runs/a --max-steps 100
  lorakit train --model ./bert --task seq-cls --data reviews.csv --eval-data dev.csv --out runs/b --epochs 2
  lorakit train --config run.yaml --out runs/c --resume
  torchrun --nproc_per_node=2 -m lorakit train --model ./m --data d.jsonl --out runs/d"""


def _switch(parser, name: str, help: str) -> None:
    parser.add_argument(
        f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=None, help=help
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA adapter on a data file",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", metavar="YAML", help="settings file; its keys are these flags' names (flags given here win)"
    )
    add_model_argument(p, required=False)
    p.add_argument(
        "--data",
        metavar="FILE",
        help=".jsonl/.json/.csv/.txt: text | prompt+completion | messages (causal-lm); text+label (seq-cls)",
    )
    p.add_argument("--eval-data", metavar="FILE", help="held-out file with the same columns")
    p.add_argument("--eval-fraction", type=float, metavar="F", help="hold out this fraction of --data instead (seeded)")
    p.add_argument("--task", choices=TASKS, help="default causal-lm")
    p.add_argument("--out", metavar="DIR", help="run folder: adapter/, metrics.jsonl, loss.png, checkpoints/")
    p.add_argument(
        "--method",
        choices=METHODS,
        help="what to train: a LoRA adapter (default), a prefix (prefix tuning), or both; layout: README",
    )
    p.add_argument("--prefix-tokens", type=int, metavar="N", help="prefix length in virtual tokens (default 20)")
    _switch(p, "prefix-projection", "train the prefix through an MLP (PEFT's prefix_projection)")
    p.add_argument(
        "--prefix-init",
        choices=PREFIX_INITS,
        help="how the prefix starts: tokens (default: the model's own keys/values of real tokens, "
        "--prefix-init-text; Li & Liang 2021), random (PEFT's default N(0, 1), which breaks the untrained model), zero",
    )
    p.add_argument(
        "--prefix-init-text",
        metavar="TEXT",
        help="with --prefix-init tokens: the text whose tokens (repeated / cut to --prefix-tokens) start the prefix "
        "(default: a task-neutral sentence, lorakit.prefix_init.DEFAULT_TEXT)",
    )
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, help="rank (default 8)")
    lora.add_argument("--alpha", type=float, help="scale = alpha / r (default 16)")
    lora.add_argument("--dropout", type=float, help="dropout on the adapter input (default 0)")
    lora.add_argument(
        "--targets",
        metavar="NAMES",
        help="comma-separated module names, a regex, or all-linear (default: per architecture)",
    )
    lora.add_argument(
        "--target-parameters",
        metavar="NAMES",
        help="comma-separated parameters adapted directly, e.g. an MoE's 3-D expert stacks: "
        "experts.gate_up_proj,experts.down_proj (one rank-r adapter per expert, PEFT's layout)",
    )
    lora.add_argument("--exclude", metavar="NAMES", help="comma-separated module names never adapted")
    lora.add_argument(
        "--modules-to-save", metavar="NAMES", help="modules trained in full (default for seq-cls: the classifier head)"
    )
    lora.add_argument("--init", choices=INITS, help="adapter initialisation (default kaiming)")
    _switch(lora, "use-rslora", "scale alpha / sqrt(r)")
    _switch(lora, "use-dora", "DoRA: weight-decomposed LoRA")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: one epoch)")
    opt.add_argument("--epochs", type=float, metavar="N", help="passes over the data (fractions allowed)")
    opt.add_argument("--batch-size", type=int, metavar="N", help="examples per micro-batch per process (default 8)")
    opt.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step (default 1)")
    opt.add_argument("--lr", type=float, metavar="X", help="peak learning rate (default 3e-3: docs/default-rates)")
    opt.add_argument(
        "--head-lr",
        type=float,
        metavar="X",
        help="peak learning rate of saved / new heads, e.g. a classifier (default: --lr)",
    )
    opt.add_argument("--weight-decay", type=float, metavar="X", help="AdamW weight decay (default 0)")
    opt.add_argument("--warmup-steps", type=int, metavar="N", help="linear warmup steps (default 0)")
    opt.add_argument("--schedule", choices=SCHEDULES, help="decay after warmup (default cosine)")
    opt.add_argument("--max-grad-norm", type=float, metavar="X", help="gradient clipping, 0 = off (default 1.0)")
    opt.add_argument("--max-length", type=int, metavar="N", help="truncate examples to N tokens (default 512)")
    opt.add_argument("--seed", type=int, metavar="N", help="seed for adapter init, data order and dropout (default 0)")
    opt.add_argument("--labels", metavar="A,B", help="seq-cls class labels in order (default: sorted labels of --data)")
    mem = p.add_argument_group("memory and precision")
    _switch(mem, "gradient-checkpointing", "recompute activations in backward: less memory, ~30%% more time")
    mem.add_argument(
        "--checkpoint-layers",
        type=float,
        metavar="F",
        help="with --gradient-checkpointing: the share of layers recomputed, evenly spread (default 1 = all)",
    )
    mem.add_argument("--bf16", choices=SWITCHES, help="bf16 autocast (auto: on CUDA GPUs that have it)")
    add_base_dtype_argument(mem, default=None)
    mem.add_argument(
        "--saved-activations",
        choices=SAVED_ACTIVATIONS,
        help="store what backward needs in bf16, computing in fp32 (auto, the default: bf16 for a quantized base)",
    )
    mem.add_argument("--device", choices=DEVICES, help="default: cuda if available")
    run = p.add_argument_group("evaluation, checkpoints, output")
    run.add_argument(
        "--eval-every", type=int, metavar="N", help="held-out evaluation every N steps (always at start and end)"
    )
    run.add_argument("--eval-batch-size", type=int, metavar="N")
    run.add_argument(
        "--save-every", type=int, metavar="N", help="checkpoint every N steps (always at the end and on Ctrl-C)"
    )
    run.add_argument("--keep-checkpoints", type=int, metavar="N", help="newest checkpoints kept (default 2)")
    run.add_argument("--log-every", type=int, metavar="N", help="write a metrics row every N steps (default 1)")
    _switch(run, "resume", "continue from the newest checkpoint in --out")
    _switch(run, "overwrite", "replace a previous run in --out")
    _switch(run, "progress", "show the progress bar (default on)")
    _switch(run, "plot", "write loss.png (default on)")
    p.set_defaults(run=run_command)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be swapped, e.g. by a test harness)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    logger = logging.getLogger("lorakit.train")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("lorakit train: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{total / 1e6:.2f} MB" if total >= 1e5 else f"{total / 1e3:.1f} kB"


def _metrics(values: dict | None) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items()) if values else "-"


def run_command(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, TrainingDiverged, train
    from ..train.config import FIELD_NAMES

    overrides = {name: getattr(args, name) for name in FIELD_NAMES if hasattr(args, name)}
    config = TrainConfig.from_sources(args.config, overrides)
    _setup_logging()
    quiet_transformers()
    try:
        result = train(config)
    except TrainingDiverged as err:
        print(f"lorakit train: error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        return 130
    print(
        f"trained {result.steps} steps in {result.seconds:.1f} s; trainable parameters {result.trainable:,} of "
        f"{result.total:,} "
        f"({100 * result.trainable / result.total:.3f}%)"
    )
    if result.eval_after:
        print(f"held-out before: {_metrics(result.eval_before)}")
        print(f"held-out after:  {_metrics(result.eval_after)}")
    out = Path(config.out)
    print(
        f"adapter: {result.adapter} ({_size(result.adapter)}); metrics: {out / 'metrics.jsonl'}"
        + (f"; plot: {out / 'loss.png'}" if (out / "loss.png").is_file() else "")
    )
    return 0
