"""Prefix tuning vs LoRA vs both on `make demo`'s task, same step budget (issue 11).

Task: SmolLM2-135M-Instruct, real movie-review sentiment as chat (system instruction, review, answer
`positive` / `negative`), loss on the answer only; `make demo`'s data split and settings (batch 8, max
length 128, 3 warm-up steps, cosine, seed 0, LoRA r=8 alpha=16 on the default q_proj,v_proj), 32 steps
for every method, each in a fresh subprocess: `lorakit train --method lora | prefix | lora+prefix`
(prefix: 20 virtual tokens per layer, no reparameterisation, started as the model's own keys and values
of a task-neutral text: `--prefix-init tokens`, the default). Reports held-out answer loss before and
after, trainable parameters and wall seconds; prints a markdown table and writes JSON.

Extra rows, clearly labelled and run after the three: `--random-init` adds prefix tuning from PEFT's
random N(0, 1) start; `--prefix-lr X` adds prefix tuning (tokens start) at learning rate X. `--methods`
picks which of the three run (`--methods "" --random-init --json X`: only an extra row, its own JSON).

    python benchmarks/prefix_vs_lora.py [--steps 32] [--lr 3e-3] [--threads 2] [--random-init] [--prefix-lr X]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("lora", "prefix", "lora+prefix")
SYSTEM = "Classify the sentiment of the movie review as positive or negative."  # as examples/demo.py


def prepare(out: Path, steps: int, batch_size: int, held_out: int) -> tuple[Path, Path]:
    from lorakit_lab import real_data as lkd

    def chat(row: dict) -> dict:
        return {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": row["text"]},
                {"role": "assistant", "content": row["label"]},
            ]
        }

    train_rows, held_rows = lkd.split(lkd.movie_reviews(), eval_fraction=0.1, seed=0)
    train_file, held_file = out / "data/train.jsonl", out / "data/held_out.jsonl"
    lkd.write_jsonl([chat(r) for r in train_rows[: steps * batch_size]], train_file)
    lkd.write_jsonl([chat(r) for r in held_rows[:held_out]], held_file)
    return train_file, held_file


def child(args) -> None:
    """One method, trained in this (fresh) process; prints one JSON line."""
    import torch

    from lorakit.cli.common import quiet_transformers
    from lorakit.models import SMOLLM2
    from lorakit.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    quiet_transformers()
    started = time.perf_counter()
    result = train(
        TrainConfig(
            model=SMOLLM2,
            data=args.train,
            eval_data=args.held,
            out=str(Path(args.out) / args.method.replace("+", "-")),
            method=args.method,
            prefix_init=args.prefix_init,
            r=8,
            alpha=16,
            max_steps=args.steps,
            batch_size=8,
            lr=args.lr,
            warmup_steps=3,
            max_length=128,
            eval_batch_size=32,
            overwrite=True,
            seed=0,
            progress=False,
            plot=False,
        )
    )
    row = {
        "method": args.method,
        "prefix_init": args.prefix_init if args.method != "lora" else None,
        "lr": args.lr,
        "trainable": result.trainable,
        "total": result.total,
        "loss_before": result.eval_before["loss"],
        "loss_after": result.eval_after["loss"],
        "train_seconds": result.seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    print("RESULT " + json.dumps(row), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="every method's learning rate (lorakit's default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/prefix_vs_lora")
    parser.add_argument("--json", default="benchmarks/results/prefix_vs_lora.json")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="which of the three main rows run (comma-separated; may be empty)"
    )
    parser.add_argument("--random-init", action="store_true", help="add a row: prefix from PEFT's random start")
    parser.add_argument("--prefix-lr", type=float, help="add a row: prefix (tokens start) at this learning rate")
    parser.add_argument("--child", choices=METHODS, dest="method", help=argparse.SUPPRESS)
    parser.add_argument("--prefix-init", default="tokens", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--held", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        child(args)
        return 0
    out = Path(args.out)
    train_file, held_file = prepare(out, args.steps, 8, 160)
    chosen = [m for m in args.methods.split(",") if m]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        parser.error(f"--methods: {unknown[0]!r} is not one of {', '.join(METHODS)}")
    cases = [(method, "tokens", args.lr) for method in chosen]
    if args.random_init:
        cases.append(("prefix", "random", args.lr))
    if args.prefix_lr:
        cases.append(("prefix", "tokens", args.prefix_lr))
    rows = []
    for method, init, lr in cases:
        command = [sys.executable, __file__, "--child", method, "--train", str(train_file), "--held", str(held_file)]
        command += ["--out", str(out / f"{init}-{lr:g}"), "--steps", str(args.steps), "--lr", str(lr)]
        command += ["--threads", str(args.threads), "--prefix-init", init]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        rows.append(json.loads(line[len("RESULT ") :]))
        rows[-1]["label"] = _label(rows[-1], args.lr)
        print(f"{rows[-1]['label']}: held-out loss {rows[-1]['loss_after']:.4f}", flush=True)
        _write(args, rows)
    print(f"\n| method ({args.steps} steps, lr {args.lr:g}) | trainable | share | held-out loss before -> after | s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        share = r["trainable"] / r["total"]
        print(
            f"| {r['label']} | {r['trainable']:,} | {share:.3%} | {r['loss_before']:.4f} -> {r['loss_after']:.4f} "
            f"| {r['wall_seconds']:.0f} |"
        )
    print(f"wrote {args.json}")
    return 0


def _label(row: dict, lr: float) -> str:
    notes = []
    if row["prefix_init"] == "random":
        notes.append("random init")
    if row["lr"] != lr:
        notes.append(f"lr {row['lr']:g}")
    return row["method"] + (f" ({', '.join(notes)})" if notes else "")


def _write(args, rows: list[dict]) -> None:
    """The JSON after every case, so a run cut short keeps what it measured."""
    record = {"steps": args.steps, "lr": args.lr, "threads": args.threads, "cpu": _cpu(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


def _cpu() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "unknown")


if __name__ == "__main__":
    sys.exit(main())
