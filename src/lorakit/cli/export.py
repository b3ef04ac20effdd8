"""`lorakit export`: write an adapter in the format another runtime reads.

    --format gguf        a llama.cpp LoRA adapter (.gguf); --merged: the whole merged model for llama-cli
                         (--dtype f16 or q8_0). DoRA, saved modules or embedding LoRAs need --merged.
    --format peft        PEFT's folder (vLLM, PEFT, transformers); --fold-scales for runtimes that read only
                         lora_alpha (vLLM ignores alpha_pattern / rank_pattern; rsLoRA folded too)
    --format diffusers   pytorch_lora_weights.safetensors for a pipeline's load_lora_weights
    --format kohya       one kohya / A1111 .safetensors file (Stable Diffusion web UIs, ComfyUI)

The adapter may itself be in any of the formats lorakit reads (PEFT, diffusers, kohya), so export also
converts between them. Every file is written atomically; an existing --out needs --overwrite.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..errors import LorakitError
from ..formats.gguf import DTYPES as GGUF_DTYPES
from .common import add_model_argument, quiet_transformers

FORMATS = ("gguf", "peft", "diffusers", "kohya")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write an adapter for llama.cpp (GGUF), PEFT/vLLM, diffusers or kohya/A1111",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--adapter", required=True, metavar="PATH", help="adapter folder or file (PEFT, diffusers, kohya)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, metavar="PATH", help="the file (.gguf, kohya .safetensors) or folder")
    p.add_argument("--merged", action="store_true", help="gguf: the whole model with the adapter merged in")
    p.add_argument("--dtype", choices=GGUF_DTYPES, help="gguf tensor type (adapter: f32; merged: f16)")
    p.add_argument("--fold-scales", action="store_true", help="peft: fold every module's scale into B")
    p.add_argument("--prefix", help="diffusers: pipeline component (unet, text_encoder ...); kohya: lora_unet_ ...")
    p.add_argument("--strict", action="store_true", help="refuse an adapter trained on other base weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(run=run)


def _check_flags(args: argparse.Namespace) -> None:
    if args.merged and args.format != "gguf":
        raise LorakitError("--merged is for --format gguf; for a merged Hugging Face folder use lorakit merge")
    if args.dtype and args.format != "gguf":
        raise LorakitError("--dtype is for --format gguf")
    if args.dtype == "q8_0" and not args.merged:
        raise LorakitError("--dtype q8_0 is for --merged models; a GGUF adapter is f32 or f16")
    if args.fold_scales and args.format != "peft":
        raise LorakitError("--fold-scales is for --format peft (gguf and kohya always write exact per-module scales)")
    out = Path(args.out)
    if out.exists() and not args.overwrite and (out.is_file() or any(out.iterdir())):
        raise LorakitError(f"--out {out} already exists; pass --overwrite or pick another path")


def run(args: argparse.Namespace) -> int:
    import lorakit

    from ..formats.gguf import write_adapter, write_merged
    from .base_models import attach, load_base

    _check_flags(args)
    quiet_transformers()
    model, tokenizer, _ = load_base(args.model, args.adapter)
    attach(model, args.adapter, strict=args.strict)
    out = Path(args.out)
    if args.format == "gguf" and args.merged:
        lorakit.merge_and_unload(model)
        with tempfile.TemporaryDirectory(prefix="lorakit-tokenizer-") as tmp:
            if tokenizer is None:
                raise LorakitError("--merged GGUF needs a language model with a tokenizer")
            tokenizer.save_pretrained(tmp)
            write_merged(model, out, tmp, dtype=args.dtype or "f16")
        what = f"merged model ({args.dtype or 'f16'})"
    elif args.format == "gguf":
        write_adapter(model, out, dtype=args.dtype or "f32")
        what = "llama.cpp LoRA adapter"
    else:
        lorakit.save_adapter(model, out, format=args.format, fold_scales=args.fold_scales, prefix=args.prefix)
        what = f"{args.format} adapter" + (" (scales folded into B)" if args.fold_scales else "")
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    print(f"wrote {what} to {out} ({size / 1e6:.2f} MB)")
    return 0
