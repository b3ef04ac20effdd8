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
                projection of their gradient, re-chosen every few steps (optim.GaLoreAdamW).

In every LoRA variant s = alpha / r with alpha fixed, as in the LoRA paper. (rsLoRA's analysis says an
Adam step then moves s·B·A less at larger r, so one rate shared across ranks may under-serve r=32.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import inject
from lorakit.model_state import lora_layers

from .galore import GaLoreAdamW

# every weight matrix of a Llama model: embeddings, the seven block matrices and the head
EVERY_MATRIX = r"model\.embed_tokens|.*_proj|lm_head"


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


def method_list(ranks: tuple[int, ...], only_ranks: tuple[int, ...], restart_rank: int) -> tuple[Method, ...]:
    return (
        Method("full", "full"),
        Method("full+ckpt", "full", checkpointing=True),
        *(Method(f"lora-only-r{r}", "lora-only", r) for r in only_ranks),
        *(Method(f"lora-r{r}", "lora", r) for r in ranks),
        Method(f"relora-r{restart_rank}", "relora", restart_rank),
        Method(f"galore-r{restart_rank}", "galore", restart_rank),
    )


def build_model(size: Size, context: int, seed: int) -> nn.Module:
    """A Llama-style causal LM over bytes (vocabulary 256), untied head, seeded random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=size.hidden,
        intermediate_size=int(size.hidden * 8 / 3) // 4 * 4,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def block_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """The effective weight of every attention/MLP matrix: base (+ the live adapter's s·B·A)."""
    adapted = dict(lora_layers(model))
    out = {}
    for path, module in model.named_modules():
        if ".layers." not in f".{path}" or path.endswith(".base_layer"):
            continue
        if path in adapted:
            layer = adapted[path]
            w = layer.base_layer.weight.detach().float().clone()
            if layer.live_adapter() is not None:
                w += layer.delta_weight(layer.live_adapter()).detach().float().reshape(w.shape)
            out[path] = w
        elif isinstance(module, nn.Linear):
            out[path] = module.weight.detach().float().clone()
    return out


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every weight that is not an adapter factor (for checking what a method froze)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}


def configure(model: nn.Module, method: Method, rates: Rates, seed: int) -> torch.optim.Optimizer:
    """Inject adapters / set what trains for `method`, and return its optimizer (no weight decay)."""
    if method.kind in ("lora", "lora-only", "relora"):
        targets = EVERY_MATRIX if method.kind == "lora-only" else "all-linear"
        inject(model, LoraConfig(r=method.rank, alpha=rates.lora_alpha, target_modules=targets), seed=seed)
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
