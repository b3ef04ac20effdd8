"""`lorakit inspect MODEL_OR_ADAPTER`: what LoRA could adapt in a model, or what an adapter holds.

For a model (built on the meta device from its config, so nothing is loaded): the layers LoRA can
wrap, grouped by name, and the exact trainable-parameter count r·(d + k) per layer summed for
the default targets and for all-linear at several ranks.
For an adapter: its config and file size, and per layer the update ΔW = s·B·A: its numerical
rank, its entropy effective rank exp(H(σ/Σσ)) (Roy & Vetterli 2007), and its Frobenius norm.
The singular values come from the small r x r core of QR factors of B and Aᵀ, never from d x k.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import LorakitError

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="targetable layers and LoRA sizes of a model, or the contents of an adapter",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "path",
        nargs="?",
        metavar="MODEL_OR_ADAPTER",
        help="model folder / hub id / smollm2-135m-instruct, or an adapter folder",
    )
    p.add_argument("--model", metavar="PATH_OR_ID", help="the model to inspect (same as the positional argument)")
    p.add_argument(
        "--ranks", default=",".join(map(str, DEFAULT_RANKS)), metavar="R,R", help="ranks for the parameter table"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(run=run)


def _table(rows: list[tuple], header: tuple) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells
    )


# ----- adapters --------------------------------------------------------------------------------
def update_spectrum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of B·A (B d x r, A r x k), from the r x r core of their QR factors."""
    a2, b2 = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    _, rb = torch.linalg.qr(b2)
    _, ra = torch.linalg.qr(a2.T)
    return torch.linalg.svdvals(rb @ ra.T)


def spectrum_stats(sigma: torch.Tensor, scale: float, dims: tuple[int, int]) -> dict[str, float]:
    top = float(sigma.max()) if sigma.numel() else 0.0
    if top == 0.0:
        return {"rank": 0, "effective_rank": 0.0, "norm": 0.0}
    rank = int((sigma > top * max(dims) * torch.finfo(torch.float32).eps).sum())
    p = sigma / sigma.sum()
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    return {"rank": rank, "effective_rank": math.exp(entropy), "norm": abs(scale) * float(sigma.square().sum().sqrt())}


def _expert_count(config, factors: dict) -> tuple[int, set[str]]:
    """(E, the expert-stack paths) of a target_parameters adapter, whose lora_A holds E·r rows (layers/experts.py).

    Without the model the parameter behind a path is unknown, so E is the count that gives every stack a rank the
    config names (r or a rank_pattern value), preferring the one that gives the most stacks the default r."""
    if not config.target_parameters:
        return 1, set()
    stacks = {p for p in factors if not (config.target_modules and _picked(config.target_modules, p))}
    ranks = {config.r, *config.rank_pattern.values()}
    rows = [factors[p]["A"].shape[0] for p in stacks]
    fits = [
        e
        for e in sorted({n // r for n in rows for r in ranks if n % r == 0})
        if all(n % e == 0 and n // e in ranks for n in rows)
    ]
    if not fits:
        return 1, set()
    return max(fits, key=lambda e: (sum(n // e == config.r for n in rows), e)), stacks


def _picked(targets, path: str) -> bool:
    from ..targets import matches

    return matches(targets, path)


def inspect_adapter(directory: Path) -> dict[str, Any]:
    from ..config import lora_scale
    from ..formats.peft import WEIGHTS_FILE
    from ..formats.peft_read import parse_adapter, read_adapter

    config, tensors = read_adapter(directory)
    adapter = parse_adapter(config, tensors)  # the loader's own checks: pairs, dtypes, finite values
    others = sum(t.numel() for t in adapter.others.values())
    layers = []
    count, stacks = _expert_count(adapter.config, adapter.factors)
    for path, parts in adapter.factors.items():
        a, b = parts["A"].float(), parts["B"].float()
        experts = count if path in stacks else 1
        r = a.shape[0] // experts
        scale = lora_scale(adapter.config.alpha_for(path), r, adapter.config.use_rslora)
        dims = (b.shape[0], a[0].numel())
        pairs = [(a[e * r : (e + 1) * r], b[:, e::experts]) for e in range(experts)]  # PEFT's expert layout
        stats = [spectrum_stats(update_spectrum(a_e, b_e), scale, dims) for a_e, b_e in pairs]
        layers.append(
            {
                "module": path,
                "shape": f"{experts} x {dims[0]} x {dims[1]}" if experts > 1 else f"{dims[0]} x {dims[1]}",
                "r": r,
                "scale": scale,
                "rank": max(s["rank"] for s in stats),  # an expert stack: the largest expert's, and ||ΔW|| over all
                "effective_rank": max(s["effective_rank"] for s in stats),
                "norm": math.sqrt(sum(s["norm"] ** 2 for s in stats)),
            }
        )
    size = (directory / WEIGHTS_FILE).stat().st_size
    return {
        "adapter": str(directory),
        "base_model": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "modules_to_save": config.get("modules_to_save"),
        "use_dora": config.get("use_dora", False),
        "use_rslora": config.get("use_rslora", False),
        "file_bytes": size,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "full_module_parameters": others,
        "layers": layers,
    }


def print_adapter(report: dict[str, Any]) -> None:
    print(
        f"adapter {report['adapter']}: PEFT LoRA for {report['base_model'] or 'an unnamed model'} "
        f"({report['task_type'] or 'no task type'})"
    )
    print(
        f"r={report['r']} lora_alpha={report['lora_alpha']} targets={report['target_modules']} "
        f"dora={report['use_dora']} "
        f"rslora={report['use_rslora']} modules_to_save={report['modules_to_save']}"
    )
    print(
        f"size: {report['file_bytes'] / 1e6:.3f} MB, {report['tensors']} tensors, {report['parameters']:,} parameters"
        + (
            f" ({report['full_module_parameters']:,} in fully saved modules)"
            if report["full_module_parameters"]
            else ""
        )
    )
    rows = [
        (
            layer["module"],
            layer["shape"],
            layer["r"],
            f"{layer['scale']:.3g}",
            layer["rank"],
            f"{layer['effective_rank']:.2f}",
            f"{layer['norm']:.4g}",
        )
        for layer in report["layers"]
    ]
    print(_table(rows, ("module", "d x k", "r", "scale", "rank(ΔW)", "eff. rank", "||ΔW||_F")))


# ----- models ----------------------------------------------------------------------------------
def meta_model(name: str):
    """The model's module tree on the meta device: shapes without memory or loading time."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..models import resolve

    path = resolve(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise LorakitError(f"could not read the config of {name}: {str(err).splitlines()[0]}") from None
    architectures = getattr(config, "architectures", None) or []
    with torch.device("meta"):
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            return AutoModelForSequenceClassification.from_config(config)
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def lora_parameters(model, targets, rank: int) -> tuple[int, int]:
    """(layers, trainable parameters) of a rank-`rank` adapter on `targets`, exactly as inject would build it."""
    from ..config import LoraConfig
    from ..layers import wrap
    from ..targets import find_targets

    found = find_targets(model, LoraConfig(r=rank, target_modules=targets))
    total = 0
    for _, module in found:
        layer = wrap(module)
        total += math.prod(layer._a_shape(rank)) + math.prod(layer._b_shape(rank))
    return len(found), total


def inspect_model(name: str, ranks: list[int]) -> dict[str, Any]:
    from ..layers import is_adaptable
    from ..model_state import walk
    from ..targets import DEFAULT_TARGETS, output_head_names

    model = meta_model(name)
    total = sum(p.numel() for p in model.parameters())
    heads = output_head_names(model)
    groups: dict[tuple, int] = {}
    for path, module in walk(model):
        if is_adaptable(module):
            weight = module.weight
            shape = " x ".join(map(str, weight.shape))
            key = (path.rsplit(".", 1)[-1], type(module).__name__, shape, path in heads)
            groups[key] = groups.get(key, 0) + 1
    layers = [
        {"name": n, "type": t, "weight_shape": s, "count": c, "output_head": h} for (n, t, s, h), c in groups.items()
    ]
    model_type = getattr(model.config, "model_type", None)
    target_sets = {}
    if model_type in DEFAULT_TARGETS:
        target_sets["default (" + ",".join(DEFAULT_TARGETS[model_type]) + ")"] = DEFAULT_TARGETS[model_type]
    target_sets["all-linear"] = "all-linear"
    per_rank = []
    for label, targets in target_sets.items():
        for r in ranks:
            n_layers, params = lora_parameters(model, targets, r)
            per_rank.append(
                {"targets": label, "r": r, "layers": n_layers, "trainable": params, "percent": 100 * params / total}
            )
    return {
        "model": name,
        "model_type": model_type,
        "class": type(model).__name__,
        "parameters": total,
        "default_targets": DEFAULT_TARGETS.get(model_type),
        "layers": layers,
        "lora": per_rank,
    }


def print_model(report: dict[str, Any]) -> None:
    print(f"model {report['model']}: {report['class']} ({report['model_type']}), {report['parameters']:,} parameters")
    print("\nlayers LoRA can adapt (grouped by name):")
    rows = [
        (row["name"] + (" (output head)" if row["output_head"] else ""), row["type"], row["weight_shape"], row["count"])
        for row in report["layers"]
    ]
    print(_table(rows, ("name", "type", "weight", "count")))
    print("\ntrainable parameters of a LoRA adapter, r·(d + k) per layer:")
    rows = [(e["targets"], e["r"], e["layers"], f"{e['trainable']:,}", f"{e['percent']:.3f}%") for e in report["lora"]]
    print(_table(rows, ("targets", "r", "layers", "trainable", "of total")))


def run(args: argparse.Namespace) -> int:
    target = args.path or args.model
    if not target:
        raise LorakitError("give a model or adapter folder: lorakit inspect PATH (or --model PATH_OR_ID)")
    try:
        ranks = [int(r) for r in str(args.ranks).split(",") if r.strip()]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise LorakitError(f"--ranks {args.ranks} is invalid: give comma-separated ranks >= 1, e.g. 4,8,16")
    from .common import quiet_transformers

    quiet_transformers()
    path = Path(target)
    is_adapter = (path / "adapter_config.json").is_file()
    report = inspect_adapter(path) if is_adapter else inspect_model(target, ranks)
    if args.json:
        print(json.dumps(report))
    elif is_adapter:
        print_adapter(report)
    else:
        print_model(report)
    return 0
