"""`lorakit verify --model M --adapter D`: run the adapter in every installed runtime and compare with lorakit.

Prints a table, one row per runtime (PEFT, diffusers for image models, the GGUF export read back with the
`gguf` package, and the scale rules vLLM and llama.cpp's converter apply to a PEFT folder): the max output
difference from lorakit on a fixed input, the adapted modules the runtime dropped, and the modules whose
scale it gets wrong (rsLoRA, alpha_pattern, mixed ranks). Exit code 0 when every runtime agrees within
--tolerance (relative to the largest output), 1 when one does not, 2 for bad input. A base model other than
the one the adapter was trained on is a warning (an error with --strict).
"""

from __future__ import annotations

import argparse

from .common import add_model_argument, quiet_transformers


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check that an adapter gives the same outputs in PEFT, diffusers, llama.cpp (GGUF) and vLLM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--adapter", required=True, metavar="PATH", help="adapter folder or file (PEFT, diffusers, kohya)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="allowed max |difference| / max |output| (1e-4)")
    p.add_argument("--strict", action="store_true", help="refuse an adapter trained on other base weights")
    p.add_argument("--json", action="store_true", help="print the checks as JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import LorakitError
    from ..verify import Verifier, as_json, table
    from .base_models import attach, fresh, load_base, output, probe

    if not args.tolerance > 0:
        raise LorakitError(f"--tolerance {args.tolerance} must be > 0, e.g. 1e-4")
    quiet_transformers()
    base, tokenizer, task = load_base(args.model, args.adapter)
    inputs = probe(base, tokenizer, task)
    model = attach(fresh(base), args.adapter, strict=args.strict)
    ids = inputs["input_ids"][0].tolist() if "input_ids" in inputs else None
    verifier = Verifier(model, lambda: fresh(base), lambda m: output(m, inputs), tokenizer, ids)
    checks = verifier.all()
    scale = verifier.reference.abs().max().item()
    if args.json:
        print(as_json(checks, args.tolerance, scale))
    else:
        print(
            f"adapter {args.adapter} on {args.model}: {len(verifier.scales)} adapted modules, max |output| {scale:.3g}"
        )
        print(table(checks, args.tolerance, scale))
    verdicts = [c.agrees(args.tolerance, scale) for c in checks]
    if False in verdicts:
        if not args.json:
            hint = ""
            if any(c.status == "rule" and c.drift for c in checks):
                hint = " (for vLLM / llama.cpp's converter: lorakit export --format peft --fold-scales)"
            if any(c.status.startswith("refuses") for c in checks):
                hint += " (where DoRA or saved modules are refused: lorakit merge, or export --format gguf --merged)"
            print(f"DISAGREE: {sum(v is False for v in verdicts)} runtime(s) differ from lorakit{hint}")
        return 1
    if not args.json:
        print(f"OK: every runtime that ran agrees within {args.tolerance:g}")
    return 0
