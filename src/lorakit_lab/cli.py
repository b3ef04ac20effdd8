"""`lorakit experiment NAME [--quick] [--out DIR]`: run one study, write report.md, PNGs and results.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorakit.errors import LorakitError

from . import EXPERIMENTS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="measure the documents' claims: " + ", ".join(EXPERIMENTS),
        description="Run one study and write DIR/report.md, DIR/*.png and DIR/results.json.",
    )
    parser.add_argument("name", choices=list(EXPERIMENTS), metavar="NAME", help="one of: " + ", ".join(EXPERIMENTS))
    parser.add_argument(
        "--quick", action="store_true", help="a smoke-sized run (under a minute; numbers not meaningful)"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: lorakit-experiments/NAME)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; use 1 on a machine shared with other jobs)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from . import default_out, run_experiment

    if args.threads is not None:
        if args.threads < 1:
            raise LorakitError(f"--threads {args.threads} is invalid: give a number of threads >= 1")
        import torch

        torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else default_out(args.name)
    command = f"lorakit experiment {args.name}" + (" --quick" if args.quick else "") + f" --out {out}"
    command += f" --threads {args.threads}" if args.threads is not None else ""
    run_experiment(args.name, out, quick=args.quick, command=command)
    print(f"wrote {out / 'report.md'}", file=sys.stderr)
    return 0
