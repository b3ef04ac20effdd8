"""`lorakit serve`: an OpenAI-compatible server for one base model and every adapter in a folder.

    lorakit serve --model smollm2-135m-instruct --adapters adapters/ --port 8000

Each subfolder of --adapters holding adapter_config.json + adapter_model.safetensors is an
adapter; a request's "model" field picks it by folder name (the base model's own name, or the
--model argument, means no adapter). Adapters load on first use, at most --max-adapters stay in
memory (least recently used go first), and requests for different adapters are decoded together.

    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "my-adapter", "prompt": "SELECT", "max_tokens": 20, "temperature": 0}'
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .common import add_base_dtype_argument, add_model_argument


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the base model and many adapters over an OpenAI-compatible API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument(
        "--adapters", metavar="DIR", help="folder of adapter folders (PEFT layout); omit to serve the base model only"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the base model's name in the API (default: the --model folder's name or id)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N", help="requests decoded together (default 32)")
    p.add_argument(
        "--max-adapters", type=int, default=32, metavar="N", help="adapters kept in memory, LRU (default 32)"
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=2048,
        metavar="N",
        help="prompt tokens prefilled per step (default 2048)",
    )
    add_limit_arguments(p)
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    add_base_dtype_argument(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=run)


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per serve.limits.Limits field, with its default and help; Limits validates the values."""
    from dataclasses import fields

    from ..serve.limits import Limits, flag

    for f in fields(Limits):
        kind = float if f.type == "float" else int
        p.add_argument(
            flag(f.name), type=kind, default=f.default, metavar="N", help=f"{f.metadata['help']} (default {f.default})"
        )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import LorakitError
    from ..models import load_model, load_tokenizer
    from ..serve import Limits, create_server
    from .common import quiet_transformers

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s lorakit serve: %(message)s", stream=sys.stderr
    )
    quiet_transformers()
    if not 0 <= args.port <= 65535:
        raise LorakitError(f"--port {args.port} is invalid: use 0-65535 (0 picks a free port)")
    if args.adapters is not None and not Path(args.adapters).is_dir():
        raise LorakitError(
            f"--adapters {args.adapters} is not a folder; give the folder that holds one subfolder per adapter"
        )
    limits = Limits(**{f: getattr(args, f) for f in Limits.__dataclass_fields__})  # refuses bad values first
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or (Path(args.model).name if Path(args.model).exists() else args.model)  # a folder or .gguf
    model = load_model(args.model, base_dtype=args.base_dtype)
    tokenizer = load_tokenizer(args.model)
    server = create_server(
        model,
        tokenizer,
        args.adapters,
        name=name,
        aliases=(args.model,),
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_adapters=args.max_adapters,
        max_prefill_tokens=args.max_prefill_tokens,
        limits=limits,
    )
    adapters = server.app.engine.adapters
    count = len(adapters.available()) if adapters is not None else 0
    logging.getLogger("lorakit.serve").info(
        "serving '%s' and %d adapter(s) on %s/v1 (Ctrl-C stops)", name, count, server.url
    )
    previous = _stop_on_signals()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _stop_on_signals() -> dict:
    """Make Ctrl-C (SIGINT) and SIGTERM stop the server cleanly; returns the handlers they replace.

    Explicit because a shell starts background jobs with SIGINT ignored, and Python then never installs its
    KeyboardInterrupt handler: without this, `lorakit serve ... &` could not be stopped with kill -INT.
    """

    def stop(signum, frame):
        raise KeyboardInterrupt

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
