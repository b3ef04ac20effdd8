"""Weighted combination of adapters, computed exactly.

    ΔW_mix = Σ_i w_i · s_i · B_i · A_i = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...] · [A_1; A_2; ...]

Concatenating the ranks makes the mix exact (rank Σ r_i, scale 1). With rank=k the product is
compressed by a truncated SVD, done through QR factors of the thin B and Aᵀ so the d x k matrix is
never formed; the relative Frobenius error of the dropped part is reported.
(PEFT's "linear" combination averages A and B separately, which is not this sum: peft#1155.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .apply_plan import apply
from .attach import AdapterPlan, LayerChange, check_new_name
from .config import LoraConfig
from .errors import LorakitError
from .layers import AdapterSpec
from .model_state import adapter_configs, lora_layers, require_adapter


@dataclass
class CombineReport:
    """What combine() built: the rank per module and how much truncation lost."""

    name: str
    ranks: dict[str, int] = field(default_factory=dict)
    relative_error: dict[str, float] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_error.values(), default=0.0)


def truncate(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-`rank` factors of b @ a (Eckart-Young) and the relative error ||ΔW - ΔW_k|| / ||ΔW||."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s[:rank].sqrt()
    b_k = (qb @ u[:, :rank]) * root
    a_k = root[:, None] * (vh[:rank] @ qa.T)
    total = float(s.square().sum())
    error = (float(s[rank:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return b_k.to(b.dtype), a_k.to(a.dtype), error


def combine(model: nn.Module, weights: dict[str, float], name: str = "mix", rank: int | None = None) -> CombineReport:
    """Add adapter `name` = Σ weights[n]·ΔW_n (exact; or its best rank-`rank` approximation) and activate it."""
    if not isinstance(weights, dict) or not weights:
        raise LorakitError("combine needs weights as a non-empty dict, e.g. {'sql': 0.7, 'poet': 0.3}")
    check_new_name(model, name)
    configs = adapter_configs(model)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LorakitError(f"rank={rank!r} is invalid: give an integer >= 1, or None for the exact combination")
    for source, weight in weights.items():
        require_adapter(model, source)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise LorakitError(f"the weight of '{source}' is {weight!r}; weights must be finite numbers")
        _check_combinable(source, configs[source])

    report = CombineReport(name)
    built = []
    with torch.no_grad():
        for path, layer in lora_layers(model):
            present = [n for n in weights if n in layer.specs]
            if not present:
                continue
            a = torch.cat([layer.a_2d(n) for n in present], dim=0)
            b = torch.cat([weights[n] * layer.specs[n].scale * layer.b_2d(n) for n in present], dim=1)
            error = 0.0
            if rank is not None and rank < a.shape[0]:
                b, a, error = truncate(b, a, rank)
            built.append((path, layer, a, b))
            report.ranks[path] = a.shape[0]
            report.relative_error[path] = error
    top = max(report.ranks.values())
    config = LoraConfig(
        r=top,
        alpha=top,
        target_modules=list(report.ranks),
        rank_pattern={re.escape(p): r for p, r in report.ranks.items() if r != top},
        alpha_pattern={re.escape(p): r for p, r in report.ranks.items() if r != top},
    )
    changes = [
        LayerChange(path, layer, layer, AdapterSpec(r=a.shape[0], scale=1.0), (a.reshape(layer._a_shape(a.shape[0])),
                    b.reshape(layer._b_shape(a.shape[0]))))
        for path, layer, a, b in built
    ]  # fmt: skip
    apply(model, AdapterPlan(name, config, changes), freeze=False, activate=True)
    return report


def _check_combinable(source: str, config: LoraConfig) -> None:
    if config.use_dora:
        raise LorakitError(
            f"adapter '{source}' uses DoRA, whose magnitude rescaling does not add up linearly; merge it instead"
        )
    if config.init == "pissa":
        raise LorakitError(
            f"adapter '{source}' is a PiSSA adapter, which owns its layers' base weights; save and reload it as a "
            "plain LoRA first"
        )
    if config.target_parameters:
        raise LorakitError(
            f"adapter '{source}' adapts parameters (target_parameters={config.target_parameters[:2]!r}...), which "
            "combine does not sum yet; merge it, or combine adapters on modules only"
        )
    if config.modules_to_save:
        raise LorakitError(
            f"adapter '{source}' has modules_to_save, which cannot be combined; combine adapters without them"
        )
