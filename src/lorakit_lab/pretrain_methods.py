"""The models and training methods that pretrain-limits compares, and what each leaves trainable.

* full          every weight trains with AdamW (the reference);
* full+ckpt     the same with gradient checkpointing (activations recomputed in backward: less
                memory, more time, identical numbers), timed for a few steps only;
* lora-only-rN  the literal "pre-train with LoRA": every weight matrix - token embeddings, the
                attention and MLP matrices, the output head - stays at its random init W0 and
                learns only through W0 + s·B·A of rank N; the RMSNorm gains (vectors) also train;
* lora-rN       LoRA (rank N) on the attention and MLP matrices, while the embeddings, norms and
                head train at full rank: the LoRA baseline of the GaLore and ReLoRA papers;
* relora-rN     lora-rN that every K steps merges s·B·A into W0 and restarts the adapter, so the
                total update can add up to rank (cycles x N) (relora.py);
* galore-rN     every weight trains, but the block matrices' AdamW moments live in a rank-N
                projection of their gradient, re-chosen every few steps (optim.GaLoreAdamW);
* moe           every weight of a mixture-of-experts model trains: the dense model's active parameters
                per token, twice its MLP weights in all (pretrain_arches.py);
* moe-lora-rN   LoRA on that MoE model: rank N on every expert of the 3-D expert stacks (one adapter
                per expert, lorakit's target_parameters) and on the attention matrices, embeddings,
                norms, router and head trained fully - lora-rN's recipe on the MoE model;
* local-wN      the dense model with block-local attention (blocks of N tokens) trains fully.

In every LoRA variant s = alpha / r with alpha fixed, as in the LoRA paper. (rsLoRA's analysis says an
Adam step then moves s·B·A less at larger r, so one rate shared across ranks may under-serve r=32.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import inject
from lorakit.layers import innermost
from lorakit.model_state import lora_layers

from .galore import GaLoreAdamW
from .pretrain_arches import build

# every weight matrix of a Llama model: embeddings, the seven block matrices and the head
EVERY_MATRIX = r"model\.embed_tokens|.*_proj|lm_head"
EXPERT_STACKS = ["experts.gate_up_proj", "experts.down_proj"]  # a Mixtral layer's 3-D expert parameters


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int


@dataclass(frozen=True)
class Method:
    key: str
    kind: str  # full | lora-only | lora | relora | galore
    rank: int | None = None
    checkpointing: bool = False
    arch: str = "dense"  # dense | moe | local (pretrain_arches.py)


@dataclass(frozen=True)
class Rates:
    """Peak learning rates: full-rank weights, LoRA factors, GaLore's projected matrices.

    lora-only gets its own factor rate (lora_only, default: lora): with every matrix frozen, its adapters
    carry all of the learning, and the pilots found it wants a different rate from lora-rN's.
    """

    full: float
    lora: float
    galore: float
    lora_only: float | None = None
    lora_alpha: float = 32.0
    galore_scale: float = 0.25
    galore_gap: int = 50

    def scaled(self, factor: float) -> Rates:
        """Every learning rate times `factor` (the learning-rate sensitivity series)."""
        only = None if self.lora_only is None else self.lora_only * factor
        return replace(
            self, full=self.full * factor, lora=self.lora * factor, galore=self.galore * factor, lora_only=only
        )


def method_list(
    ranks: tuple[int, ...], only_ranks: tuple[int, ...], restart_rank: int, block: int = 16
) -> tuple[Method, ...]:
    return (
        Method("full", "full"),
        Method("full+ckpt", "full", checkpointing=True),
        *(Method(f"lora-only-r{r}", "lora-only", r) for r in only_ranks),
        *(Method(f"lora-r{r}", "lora", r) for r in ranks),
        Method(f"relora-r{restart_rank}", "relora", restart_rank),
        Method(f"galore-r{restart_rank}", "galore", restart_rank),
        Method("moe", "full", arch="moe"),
        Method(f"moe-lora-r{restart_rank}", "lora", restart_rank, arch="moe"),
        Method(f"local-w{block}", "full", arch="local"),
    )


def build_model(size: Size, context: int, seed: int, method: Method | None = None) -> nn.Module:
    """A causal LM over bytes (vocabulary 256), untied head, seeded random init, of `method`'s family."""
    arch = method.arch if method is not None else "dense"
    block = int(method.key.rsplit("-w", 1)[1]) if arch == "local" else 16
    return build(size, context, seed, arch, block)


def block_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """The effective weight of every attention/MLP matrix: base (+ the live adapter's ΔW); a 3-D expert
    stack counts as one matrix per expert ("<path>.<parameter>[e]")."""
    adapted = {layer.target_key(p) if layer.parameter_name else p: layer for p, layer in lora_layers(model)}
    out = {}
    for path, module in model.named_modules():
        if ".layers." not in f".{path}" or ".base_layer" in path or ".lora_" in path:
            continue
        if isinstance(module, nn.Linear) or path in adapted:
            out[path] = _effective(adapted.get(path), module)
        for name, param in innermost(module)._parameters.items():
            if param is not None and param.dim() == 3 and f"{path}.{name}" not in out:
                w = _effective(adapted.get(f"{path}.{name}"), param)
                out.update({f"{path}.{name}[{e}]": w[e] for e in range(w.shape[0])})
    return out


def _effective(layer, base) -> torch.Tensor:
    if layer is None:
        return (base if isinstance(base, torch.Tensor) else base.weight).detach().float().clone()
    w = layer.weight_param().detach().float().clone()
    if layer.live_adapter() is not None:
        w += layer.delta_weight(layer.live_adapter()).detach().float().reshape(w.shape)
    return w


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every weight that is not an adapter factor (for checking what a method froze)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}


def configure(model: nn.Module, method: Method, rates: Rates, seed: int) -> torch.optim.Optimizer:
    """Inject adapters / set what trains for `method`, and return its optimizer (no weight decay)."""
    if method.kind in ("lora", "lora-only", "relora"):
        targets = EVERY_MATRIX if method.kind == "lora-only" else "all-linear"
        experts = EXPERT_STACKS if method.arch == "moe" else None
        config = LoraConfig(r=method.rank, alpha=rates.lora_alpha, target_modules=targets, target_parameters=experts)
        inject(model, config, seed=seed)
        adapted = {p for p, _ in lora_layers(model)}
        factors, rest = [], []
        for name, param in model.named_parameters():
            if any(name.startswith(a + ".") for a in adapted):
                if param.requires_grad:  # A and B; the wrapped base weight stays frozen
                    factors.append(param)
            elif method.kind == "lora-only" and param.dim() > 1:
                param.requires_grad_(False)  # defensive: nothing matrix-shaped escapes the adapters
            else:
                # lora / relora: embeddings, norms and head train fully; lora-only: only the norm gains
                param.requires_grad_(True)
                rest.append(param)
        factor_lr = rates.lora_only if method.kind == "lora-only" and rates.lora_only is not None else rates.lora
        return torch.optim.AdamW(
            [{"params": factors, "lr": factor_lr}, {"params": rest, "lr": rates.full}], weight_decay=0.0
        )
    if method.kind == "galore":
        matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in f".{n}"]
        ids = {id(p) for p in matrices}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return GaLoreAdamW(
            [
                {
                    "params": matrices,
                    "rank": method.rank,
                    "update_gap": rates.galore_gap,
                    "scale": rates.galore_scale,
                    "lr": rates.galore,
                },
                {"params": rest, "lr": rates.full},
            ],
            lr=rates.full,
        )
    return torch.optim.AdamW(model.parameters(), lr=rates.full, weight_decay=0.0)
