"""`lorakit generate`: text from a model, with an adapter or a weighted mix of several.

The prompt goes through the model's chat template when it has one (--raw to send it as is).
Several --adapter folders are combined exactly, ΔW = Σ w_i·ΔW_i (`DIR:0.5` sets a weight).
Greedy decoding unless --temperature > 0 (sampling seeded by --seed, as a server request's `seed`).
Decoding runs the serving engine's loop: a preallocated KV cache and a lean decode step.
"""

from __future__ import annotations

import argparse
import sys

from ..train.config import DEVICES
from .common import add_base_dtype_argument, add_model_argument, load_with_adapters, quiet_transformers


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a model and adapter(s)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR[:WEIGHT]",
        help="adapter folder; repeat to combine adapters",
    )
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw); - reads stdin")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--base", action="store_true", help="also print the base model's answer (adapters off)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default), up to 2")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=DEVICES, default="auto")
    add_base_dtype_argument(p)
    p.set_defaults(run=run)


def parse_adapter(spec: str) -> tuple[str, float]:
    from ..errors import LorakitError

    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        return spec, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise LorakitError(f"--adapter {spec}: the part after ':' must be a weight, e.g. {path}:0.5") from None


def build_prompt(tokenizer, prompt: str, system: str | None = None, raw: bool = False) -> str:
    """The chat-templated prompt (ready for the assistant's turn), or `prompt` itself if raw / no template."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_text(
    model,
    tokenizer,
    text: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    templated: bool = True,
    seed: int = 0,
) -> str:
    """The continuation of `text` (special tokens dropped); a templated text already has its special tokens.

    Decodes with the serving engine (preallocated KV cache, lean decode step) and the model's active
    adapter; models the engine cannot run (no plain key/value cache, an active prefix) use transformers' generate."""
    import torch

    from ..adapters import active_adapter
    from ..errors import LorakitError
    from ..prefix import active_prefix
    from ..serve.engine import Engine
    from ..serve.sampling import SamplingParams

    ids = tokenizer(text, add_special_tokens=not templated).input_ids
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if active_prefix(model) is not None:  # the engine's static cache has no room for a prefix
        return _transformers_generate(model, tokenizer, torch.tensor([ids]), params)
    try:
        engine = Engine(model, max_batch=1, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id or 0)
    except LorakitError:  # e.g. a sliding-window cache: transformers' own loop
        return _transformers_generate(model, tokenizer, torch.tensor([ids]), params)
    request = engine.submit(ids, active_adapter(model), params)
    while engine.step():
        pass
    tokens = [value for kind, value in request if kind == "token"]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _transformers_generate(model, tokenizer, ids, params) -> str:
    import torch

    torch.manual_seed(params.seed)
    sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
    with torch.no_grad():
        output = model.generate(
            ids.to(next(model.parameters()).device),
            max_new_tokens=params.max_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **(sampling if not params.greedy else {"do_sample": False}),
        )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    import lorakit

    from ..errors import LorakitError
    from ..train.distributed import pick_device

    if args.max_new_tokens < 1 or not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1:
        raise LorakitError("--max-new-tokens must be >= 1, --temperature from 0 to 2 and --top-p in (0, 1]")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    quiet_transformers()
    specs = [parse_adapter(a) for a in args.adapter]
    names = [f"adapter{i + 1}" for i in range(len(specs))]
    model, tokenizer, task, _ = load_with_adapters(
        args.model, [p for p, _ in specs], names=names, base_dtype=args.base_dtype
    )
    if task != "causal-lm":
        raise LorakitError("this adapter is for sequence classification; use `lorakit eval` to score it")
    if lorakit.list_prefixes(model) and (len(specs) > 1 or specs[0][1] != 1.0):
        raise LorakitError(
            "a prefix adapter (--method prefix / lora+prefix) cannot be mixed; give it alone as --adapter DIR"
        )
    if len(specs) > 1 or (specs and specs[0][1] != 1.0):
        lorakit.combine(model, {n: w for n, (_, w) in zip(names, specs)}, name="mix")
    model.to(pick_device(args.device))
    text = build_prompt(tokenizer, prompt, args.system, args.raw)
    options = (args.max_new_tokens, args.temperature, args.top_p, text != prompt, args.seed)
    if args.base and specs:
        prefix = lorakit.active_prefix(model)
        with lorakit.disabled(model):
            lorakit.set_prefix(model, None)  # disabled() turns LoRA off; the base has no prefix either
            print("[base]", generate_text(model, tokenizer, text, *options))
        lorakit.set_prefix(model, prefix)
        print("[adapted]", end=" ")
    print(generate_text(model, tokenizer, text, *options))
    return 0
