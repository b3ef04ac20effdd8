"""lorakit_lab: the research lab beside the library. It imports lorakit; lorakit never imports it.

Reproducible studies of the documents' claims: `lorakit experiment NAME [--quick] [--out DIR]`
(the subcommand is registered through the `lorakit.commands` entry point, see cli.py).

Each study is one module with `run(out, quick, command) -> dict`; it writes report.md, PNG plots
and results.json into `out`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lorakit.errors import LorakitError

# experiment name -> module in this package
EXPERIMENTS = {
    "params": "params",
    "pretrain-limits": "pretrain_limits",
    "delta-rank": "delta_rank",
    "finetune-vs-full": "finetune_vs_full",
    "image-styles": "image_styles",
    "default-rates": "default_rates",
}


def default_out(name: str) -> Path:
    """Where a study writes when no --out is given (ignored by git)."""
    return Path("lorakit-experiments") / name


def run_experiment(name: str, out: str | Path | None = None, quick: bool = False, command: str | None = None) -> dict:
    if name not in EXPERIMENTS:
        raise LorakitError(f"experiment {name!r} is unknown; choose one of: {', '.join(EXPERIMENTS)}")
    out = Path(out) if out is not None else default_out(name)
    if out.exists() and not out.is_dir():  # checked before a run that may take minutes, not only when writing
        raise LorakitError(f"--out {out} is a file; give a folder for the report")
    command = command or f"lorakit experiment {name}" + (" --quick" if quick else "") + f" --out {out}"
    module = importlib.import_module(f"{__name__}.{EXPERIMENTS[name]}")
    return module.run(out, quick, command)
