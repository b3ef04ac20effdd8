"""pretrain-limits: why LoRA is a fine-tuning method and not a pre-training one, measured.

Llama-style models of three sizes start from random weights and learn real text (Shakespeare's
plays, byte-level) with the same token budget under each method:

* full      every weight trains with AdamW (the reference);
* +ckpt     the same with gradient checkpointing: activations are recomputed in backward, so
            memory drops and time rises while the numbers stay identical (timed for a few steps);
* lora-rN   the random W0 of every block matrix stays frozen and only s·B·A (rank N) learns, plus
            embeddings, norms and the output head (as in the GaLore and ReLoRA papers' baselines);
* relora    LoRA that every K steps merges B·A into W0 and restarts (rank can add up over cycles);
* galore    every weight trains, but AdamW's moments live in a rank-N projection of the gradient.

The documents give four reasons LoRA suits pre-training badly: limited parameter space, limited
expressiveness, training stability, scalability. Each is answered with a number: trainable
parameters; the rank of the learned update W_final - W_init (how much of the space a method used);
the roughness of the loss curve; and the held-out gap to full-rank as the model grows (the shape
of the GaLore paper's Table 2). A replication on Python's standard library checks it is not
specific to one corpus.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm import tqdm

from ..config import LoraConfig
from ..inject import inject
from ..optim import GaLoreAdamW, cosine_schedule
from ..registry import lora_layers
from . import corpora
from .meter import PeakMemory, accounted_total, activation_bytes, state_bytes
from .relora import jagged_factor, merge_and_restart
from .pretrain_report import write_report
from .report import Report
from .spectra import energy_rank

TITLE = "pretrain-limits: full-rank vs LoRA vs ReLoRA vs GaLore when pre-training from scratch"


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int


@dataclass(frozen=True)
class Method:
    key: str
    kind: str  # full | lora | relora | galore
    rank: int | None = None
    checkpointing: bool = False


@dataclass
class Plan:
    sizes: tuple[Size, ...]
    methods: tuple[Method, ...]
    corpus: str = "shakespeare"
    steps: int = 300
    batch: int = 16
    context: int = 128
    lr_full: float = 3e-3
    lr_lora: float = 1e-2
    lora_alpha: float = 32.0
    lr_galore: float = 1e-2
    eval_points: int = 6
    eval_windows: int = 64
    relora_every: int = 100
    galore_gap: int = 50
    ckpt_steps: int = 8
    max_bytes: int | None = None
    replicate: tuple[str, Size, tuple[str, ...]] | None = None  # (corpus, size, method keys)
    longer: tuple[Size, int, tuple[str, ...]] | None = None  # (size, steps, method keys): the budget's effect
    seed: int = 0
    extra: dict = field(default_factory=dict)


def methods(ranks: tuple[int, ...], restart_rank: int) -> tuple[Method, ...]:
    return (
        Method("full", "full"),
        Method("full+ckpt", "full", checkpointing=True),
        *(Method(f"lora-r{r}", "lora", r) for r in ranks),
        Method(f"relora-r{restart_rank}", "relora", restart_rank),
        Method(f"galore-r{restart_rank}", "galore", restart_rank),
    )


FULL = Plan(
    sizes=(Size("0.06M", 32, 4, 2), Size("0.2M", 64, 4, 2), Size("0.8M", 128, 4, 4)),
    methods=methods((8, 32, 128), 32),
    steps=200, batch=8, context=128, relora_every=50, galore_gap=50, lr_lora=3e-3,
    replicate=("python-stdlib", Size("0.2M", 64, 4, 2), ("full", "lora-r8", "lora-r32", "relora-r32", "galore-r32")),
    longer=(Size("0.2M", 64, 4, 2), 800, ("full", "lora-r8", "lora-r32", "relora-r32", "galore-r32")),
    extra={"lr_pilot": "learning rates from pilots, held-out loss. Full-rank at 0.8M, 300 steps x 16: 3e-3 -> 2.02, 1e-2 -> 2.35. "
                       "LoRA factors (alpha 32) at 200 steps x 8: 0.2M lora-r32 1e-3 -> 2.40, 3e-3 -> 2.31, 1e-2 -> 3.03; "
                       "0.8M lora-r32 1e-3 -> 2.25, 3e-3 -> 2.27, 1e-2 -> 3.22, lora-r8 3e-3 -> 2.25. "
                       "GaLore at 0.8M, 300 steps x 16: 1e-2 -> 2.05, 3e-2 -> 1.98. The first LoRA pilot (1e-2, with the embeddings "
                       "also at 1e-2) was misleading: too high a rate for the factors makes LoRA look far worse than it is here"},
)
QUICK = Plan(
    sizes=(Size("tiny", 32, 2, 2),),
    methods=methods((4, 16), 8),
    steps=16, batch=8, context=64, eval_points=2, eval_windows=8, relora_every=6, galore_gap=6, ckpt_steps=3,
    longer=(Size("tiny", 32, 2, 2), 24, ("full", "lora-r4")),
    max_bytes=400_000,
)


def build_model(size: Size, context: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=size.hidden, intermediate_size=int(size.hidden * 8 / 3) // 4 * 4,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=context, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def block_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """The effective weight of every attention/MLP matrix: base (+ live adapter's s·B·A)."""
    adapted = dict(lora_layers(model))
    out = {}
    for path, module in model.named_modules():
        if ".layers." not in f".{path}" or path.endswith(".base_layer"):
            continue
        if path in adapted:
            layer = adapted[path]
            w = layer.base_layer.weight.detach().float().clone()
            if layer.live_adapter() is not None:
                w += layer.delta_weight(layer.live_adapter()).detach().float()
            out[path] = w
        elif isinstance(module, nn.Linear):
            out[path] = module.weight.detach().float().clone()
    return out


def configure(model: nn.Module, method: Method, plan: Plan):
    """Inject adapters / set trainable weights, and build the optimizer for `method`."""
    if method.kind in ("lora", "relora"):
        # alpha fixed, so s = alpha / r: the LoRA paper's scaling, which keeps the size of an Adam
        # step on s·B·A about the same at every rank (alpha = r would make r=128 steps 16x larger)
        inject(model, LoraConfig(r=method.rank, alpha=plan.lora_alpha, target_modules="all-linear"), seed=plan.seed)
        adapted = {p for p, _ in lora_layers(model)}
        factors, rest = [], []
        for name, param in model.named_parameters():
            if any(name.startswith(a + ".") for a in adapted):
                if param.requires_grad:
                    factors.append(param)
            else:
                # embeddings, norms and the head train fully, at full-rank's learning rate
                # (the GaLore and ReLoRA papers' LoRA baselines train them too)
                param.requires_grad_(True)
                rest.append(param)
        return torch.optim.AdamW([{"params": factors, "lr": plan.lr_lora}, {"params": rest, "lr": plan.lr_full}], weight_decay=0.0)
    if method.kind == "galore":
        matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in f".{n}"]
        ids = {id(p) for p in matrices}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return GaLoreAdamW(
            [{"params": matrices, "rank": method.rank, "update_gap": plan.galore_gap, "scale": 0.25, "lr": plan.lr_galore},
             {"params": rest, "lr": plan.lr_full}],
            lr=plan.lr_full,
        )
    return torch.optim.AdamW(model.parameters(), lr=plan.lr_full, weight_decay=0.0)


@torch.no_grad()
def held_out_loss(model: nn.Module, windows: torch.Tensor, batch: int) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    model.train(was_training)
    return total / len(windows)


def roughness(losses: list[float]) -> float:
    """Mean |step-to-step change| of the training loss over the second half: noise, spikes, restarts."""
    tail = losses[len(losses) // 2 :]
    return sum(abs(b - a) for a, b in zip(tail, tail[1:])) / max(1, len(tail) - 1)


def run_one(size: Size, method: Method, corpus: corpora.Corpus, plan: Plan, windows: torch.Tensor, bar: tqdm) -> dict:
    model = build_model(size, plan.context, plan.seed)
    start = block_matrices(model)
    total_params = sum(p.numel() for p in model.parameters())
    optimizer = configure(model, method, plan)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    steps = plan.ckpt_steps if method.checkpointing else plan.steps
    lr0 = {id(g): g["lr"] for g in optimizer.param_groups}
    generator = torch.Generator().manual_seed(plan.seed + 1)  # every method sees the same batches
    restart_gen = torch.Generator().manual_seed(plan.seed + 2)
    warmup = max(1, steps // 10)
    eval_at = {round(steps * (i + 1) / plan.eval_points) - 1 for i in range(plan.eval_points)}
    losses, evals, times, restarts = [], [], [], 0
    with PeakMemory() as peak:
        for step in range(steps):
            factor = cosine_schedule(step, steps, warmup)
            if method.kind == "relora":
                factor *= jagged_factor(step, plan.relora_every, max(2, plan.relora_every // 10))
            for g in optimizer.param_groups:
                g["lr"] = lr0[id(g)] * factor
            batch = corpus.batch("train", plan.batch, plan.context, generator)
            began = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep grads allocated: what a training step really holds
            times.append(time.perf_counter() - began)
            losses.append(loss.item())
            if method.kind == "relora" and (step + 1) % plan.relora_every == 0 and step + 1 < steps:
                merge_and_restart(model, "default", optimizer, restart_gen)
                restarts += 1
            if step in eval_at and not method.checkpointing:
                evals.append((step + 1, held_out_loss(model, windows, plan.batch)))
            bar.update(1)
            if not math.isfinite(losses[-1]):
                break
    memory = state_bytes(model, optimizer)
    probe = corpus.batch("train", plan.batch, plan.context, torch.Generator().manual_seed(0))
    memory["activations"] = activation_bytes(model, lambda: model(input_ids=probe, labels=probe).loss)
    result = {
        "size": size.name, "method": method.key, "kind": method.kind, "rank": method.rank,
        "params": total_params, "trainable": trainable, "steps": steps,
        "tokens": steps * plan.batch * plan.context,
        "step_seconds": sum(times[2:]) / max(1, len(times) - 2) if len(times) > 2 else sum(times) / len(times),
        "memory": memory, "memory_accounted": accounted_total(memory),
        "measured_rss_rise": peak.rise, "restarts": restarts,
    }
    if method.checkpointing:
        return result
    end = block_matrices(model)
    ranks = [energy_rank(end[k] - start[k], 0.9) for k in start]
    full_ranks = [min(start[k].shape) for k in start]
    final = evals[-1][1] if evals else float("nan")
    result.update({
        "train_loss": losses, "eval_curve": evals, "held_out_loss": final,
        "held_out_ppl": math.exp(final) if math.isfinite(final) else float("nan"),
        "roughness": roughness(losses),
        "update_rank90_mean": sum(ranks) / len(ranks), "update_rank_max_possible": sum(full_ranks) / len(full_ranks),
    })
    return result


def run(out, quick: bool, command: str) -> dict:
    plan = QUICK if quick else FULL
    report = Report("pretrain-limits", TITLE, command, quick)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
    corpus = corpora.load(plan.corpus, plan.max_bytes)
    jobs = [("main", plan.corpus, s, m, plan) for s in plan.sizes for m in plan.methods]
    if plan.replicate:
        name, size, keys = plan.replicate
        jobs += [("replicate", name, size, m, plan) for m in plan.methods if m.key in keys]
    if plan.longer:
        size, steps, keys = plan.longer
        jobs += [("longer", plan.corpus, size, m, replace(plan, steps=steps)) for m in plan.methods if m.key in keys]
    loaded = {plan.corpus: corpus}
    total_steps = sum(p.ckpt_steps if m.checkpointing else p.steps for _, _, _, m, p in jobs)
    runs = []
    with tqdm(total=total_steps, desc="pretrain-limits", unit="step") as bar:
        for series, corpus_name, size, method, job_plan in jobs:
            if corpus_name not in loaded:
                loaded[corpus_name] = corpora.load(corpus_name, plan.max_bytes)
            c = loaded[corpus_name]
            bar.set_postfix_str(f"{series} {corpus_name} {size.name} {method.key}")
            record = run_one(size, method, c, job_plan, c.eval_windows(plan.context, plan.eval_windows), bar)
            record["corpus"], record["series"] = corpus_name, series
            runs.append(record)
    results = {
        "plan": {k: v for k, v in plan.__dict__.items() if k not in ("sizes", "methods", "replicate", "longer")}
        | {"sizes": [s.__dict__ for s in plan.sizes], "methods": [m.key for m in plan.methods]},
        "corpora": {n: {"train_bytes": len(c.train), "held_out_bytes": len(c.held_out), "files": c.files} for n, c in loaded.items()},
        "runs": runs,
    }
    write_report(report, results, plan)
    report.write(out, results)
    return results
