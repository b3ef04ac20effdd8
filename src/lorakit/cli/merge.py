"""`lorakit merge`: fold an adapter into the base weights and save a standalone model.

W ← W0 + s·B·A in every adapted layer, lorakit's wrappers removed, then `save_pretrained` with
safetensors plus the tokenizer: the folder loads with plain transformers (no lorakit, no PEFT)
and gives the adapted model's outputs, which this command checks on a short input before saving.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_base_dtype_argument, add_model_argument, load_with_adapters, quiet_transformers

CHECK_TEXT = "LoRA adds a low-rank update to a frozen weight."
# --dtype: the torch dtype the merged weights are saved in
SAVE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge an adapter into the model and save it (Hugging Face layout)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (e.g. RUN/adapter)")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where the merged model goes (config.json, model.safetensors, tokenizer)",
    )
    p.add_argument(
        "--dtype", choices=list(SAVE_DTYPES), default="fp32", help="dtype of the saved weights (default fp32)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_base_dtype_argument(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import lorakit

    from ..errors import LorakitError
    from ..io import atomic_directory
    from ..quant import merge_precision

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise LorakitError(f"--out {out} already exists and is not empty; pass --overwrite or pick another folder")
    quiet_transformers()
    model, tokenizer, task, _ = load_with_adapters(args.model, [args.adapter], base_dtype=args.base_dtype)
    probe = tokenizer(CHECK_TEXT, return_tensors="pt")
    precision = merge_precision(model)
    with torch.no_grad():
        adapted = model(**probe).logits
        lorakit.merge_and_unload(model)
        merged = model(**probe).logits
    difference = (merged - adapted).abs().max().item()
    scale = adapted.abs().max().item()
    if not difference <= 1e-4 * max(1.0, scale):
        raise LorakitError(
            f"the merged model's outputs differ from the adapter's by {difference:.3g}; the adapter may hold "
            "non-finite values"
        )
    dtype = getattr(torch, SAVE_DTYPES[args.dtype])
    model.to(dtype)
    model.config.use_cache = True
    with atomic_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    print(f"merged {args.adapter} into {args.model}: max |merged - adapted| logit difference {difference:.2e}")
    print(f"saved a standalone {task} model ({args.dtype}, {size / 1e6:.1f} MB of safetensors) to {out}")
    if precision:
        kinds = ", ".join(sorted({kind for _, kind, _, _ in precision}))
        change = max(c for _, _, c, _ in precision)
        error = sum(e for _, _, _, e in precision) / len(precision)
        print(
            f"the base was stored as {kinds}; merged layers are kept in {args.dtype}: re-quantizing them to {kinds} "
            f"would add {100 * error:.2f}% relative error on average over {len(precision)} layers, while the adapter "
            f"changed them by at most {100 * change:.2f}%"
        )
    return 0
