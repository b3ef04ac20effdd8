"""pretrain-limits: why LoRA is a fine-tuning method and not a pre-training one, measured.

Llama-style byte-level models start from random weights and learn real text (Shakespeare's plays)
under each method of pretrain_methods.py: full-rank, LoRA-only (every weight frozen at its random
init, only the adapters learn), LoRA with trainable embeddings/norms/head, ReLoRA-style
merge-and-restart and GaLore-style gradient projection, plus the other alternatives the documents
name: gradient checkpointing for memory, a mixture of experts (the dense model's active parameters
per token, more in total), block-local (sparse) attention, and LoRA on the MoE model's experts.
Every comparison runs with several seeds; gaps are paired by seed and the verdicts use their 95%
interval (pretrain_runs.Spread) instead of a fixed band.

The documents give four reasons LoRA suits pre-training badly; each gets a measurement:

* limited parameter space: trainable parameters, and LoRA-only against LoRA with trainable
  embeddings/head (what is lost when the random init of those weights can never change);
* limited expressiveness: rank90(W_t - W_0) of the learned update against steps - full-rank's
  keeps growing while a LoRA adapter's is capped at r;
* training stability: loss-curve roughness, and the held-out loss when every learning rate of a
  method is scaled by 1/3 or 3 (how sharply each method punishes a mis-set rate);
* scalability: the held-out gap to full-rank at fixed ranks as the width grows (r/d shrinks; the
  shape of the GaLore paper's Table 2) and as training goes on (the gap against tokens seen, plus
  a longer run at the smallest size, where the token budget per parameter gets closest to theirs).

A small replication on Python's standard library checks that the picture is not one corpus's.
Learning rates come from pilot runs recorded in the report (plan.extra["pilots"]).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from . import corpora
from .pretrain_methods import Method, Rates, Size, method_list
from .pretrain_report import write_report
from .pretrain_train import Budget, run_one
from .report import Report

TITLE = "pretrain-limits: full-rank vs LoRA vs ReLoRA vs GaLore when pre-training from scratch"


@dataclass(frozen=True)
class Arm:
    """One model size and the methods run on it, at that size's learning rates."""

    size: Size
    rates: Rates
    methods: tuple[str, ...]


@dataclass(frozen=True)
class Series:
    """Extra runs beside the main grid: a longer budget, a learning-rate check, another corpus."""

    name: str  # longer | lr | replicate
    corpus: str
    arm: Arm
    budget: Budget
    lr_scales: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)


@dataclass
class Plan:
    arms: tuple[Arm, ...]
    budget: Budget
    methods: dict[str, Method]
    corpus: str = "shakespeare"
    eval_windows: int = 64
    max_bytes: int | None = None
    series: tuple[Series, ...] = ()
    extra: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)  # each seed: its own init and batch order, shared by every method

    def jobs(self):
        """(series, corpus, size, method, rates, budget, lr_scale) for every run, main grid first;
        the budget carries the seed. Timing-only runs (checkpointing) run at the first seed only."""
        for seed in self.seeds:
            for arm in self.arms:
                for key in arm.methods:
                    method = self.methods[key]
                    if seed == self.seeds[0] or not method.checkpointing:
                        yield "main", self.corpus, arm.size, method, arm.rates, replace(self.budget, seed=seed), 1.0
        for s in self.series:
            for seed in s.seeds:
                for scale in s.lr_scales:
                    for key in s.arm.methods:
                        budget, rates = replace(s.budget, seed=seed), s.arm.rates.scaled(scale)
                        yield s.name, s.corpus, s.arm.size, self.methods[key], rates, budget, scale


METHODS = {m.key: m for m in method_list(ranks=(8, 32), only_ranks=(8, 32), restart_rank=8, block=16)}
S32, S64, S128 = Size("0.06M", 32, 4, 2), Size("0.2M", 64, 4, 2), Size("0.8M", 128, 4, 4)
EVERY = ("full", "full+ckpt", "lora-only-r8", "lora-only-r32", "lora-r8", "lora-r32", "relora-r8", "galore-r8")
ALTERNATIVES = ("moe", "moe-lora-r8", "local-w16")
CORE = ("full", "lora-only-r8", "lora-r8")
SEEDS = (0, 1, 2)
# Cut to fit about 40 minutes on 2 shared cores with 3 seeds everywhere: 150 steps (was 400) and sizes 0.06M and
# 0.2M (was 0.2M, 0.8M and 3.3M); the series run at the smaller size.
FULL_BUDGET = Budget(steps=150, batch=8, context=128, eval_points=5, relora_every=50, ckpt_steps=8)
# rates from the pilots below (0.8M and 3.3M, an earlier plan's sizes; the report compares each chosen rate with
# its best pilot rate where a size was piloted); 0.06M and 0.2M were not, and the "lr" series (x1/3, x3 at 0.06M)
# shows whether the rates were fair for full-rank and both LoRA arms. MoE and block-local attention train at the
# full-rank rate, moe-lora at lora-rN's.
R64 = Rates(full=3e-3, lora=3e-3, galore=1e-2, lora_only=3e-3)
PILOTS = [  # (size, method, rate varied, lr, held-out loss after 200 steps x 8 x 128 bytes)
    ("0.8M", "full", "all weights", 1e-3, 2.365),
    ("0.8M", "full", "all weights", 3e-3, 2.283),
    ("0.8M", "full", "all weights", 1e-2, 2.604),
    ("0.8M", "lora-only-r8", "LoRA factors", 1e-3, 2.555),
    ("0.8M", "lora-only-r8", "LoRA factors", 3e-3, 2.431),
    ("0.8M", "lora-only-r8", "LoRA factors", 1e-2, 2.664),
    ("0.8M", "lora-only-r8", "LoRA factors", 3e-2, 3.273),
    ("0.8M", "lora-r8", "LoRA factors", 1e-3, 2.239),
    ("0.8M", "lora-r8", "LoRA factors", 3e-3, 2.250),
    ("0.8M", "lora-r8", "LoRA factors", 1e-2, 2.960),
    ("0.8M", "galore-r8", "projected matrices", 3e-3, 2.547),
    ("0.8M", "galore-r8", "projected matrices", 1e-2, 2.416),
    ("0.8M", "galore-r8", "projected matrices", 3e-2, 2.412),
    ("3.3M", "full", "all weights", 1e-3, 2.268),
    ("3.3M", "full", "all weights", 3e-3, 2.367),
    ("3.3M", "lora-only-r8", "LoRA factors", 1e-3, 2.459),
    ("3.3M", "lora-only-r8", "LoRA factors", 3e-3, 2.366),
    ("3.3M", "lora-only-r8", "LoRA factors", 1e-2, 3.168),
    ("3.3M", "lora-r8", "LoRA factors", 1e-3, 2.282),
    ("3.3M", "lora-r8", "LoRA factors", 3e-3, 2.670),
]
FULL = Plan(
    arms=(Arm(S32, R64, CORE + ("moe", "local-w16")), Arm(S64, R64, EVERY + ALTERNATIVES)),
    budget=FULL_BUDGET,
    methods=METHODS,
    seeds=SEEDS,
    series=(
        Series("longer", "shakespeare", Arm(S32, R64, CORE), replace(FULL_BUDGET, steps=300), seeds=SEEDS),
        Series("lr", "shakespeare", Arm(S32, R64, CORE), FULL_BUDGET, (1 / 3, 3.0), seeds=SEEDS),
        Series("replicate", "python-stdlib", Arm(S32, R64, CORE), FULL_BUDGET, seeds=SEEDS),
    ),
    extra={
        "pilots": [
            {"size": p[0], "method": p[1], "rate varied": p[2], "lr": p[3], "held-out loss, 200 steps": p[4]}
            for p in PILOTS
        ]
    },
)
QUICK_SIZE = Size("tiny", 32, 2, 2)
QUICK_METHODS = {m.key: m for m in method_list(ranks=(4,), only_ranks=(4,), restart_rank=4, block=16)}
QUICK_RATES = Rates(full=3e-3, lora=3e-3, galore=1e-2, galore_gap=6)
QUICK_BUDGET = Budget(steps=16, batch=8, context=64, eval_points=2, relora_every=6, ckpt_steps=3)
QUICK = Plan(
    arms=(Arm(QUICK_SIZE, QUICK_RATES, tuple(QUICK_METHODS)),),
    budget=QUICK_BUDGET,
    methods=QUICK_METHODS,
    eval_windows=8,
    max_bytes=400_000,
    seeds=(0, 1),
    series=(
        Series(
            "longer",
            "shakespeare",
            Arm(QUICK_SIZE, QUICK_RATES, ("full", "lora-r4")),
            replace(QUICK_BUDGET, steps=24),
            seeds=(0, 1),
        ),
        Series(
            "lr",
            "shakespeare",
            Arm(QUICK_SIZE, QUICK_RATES, ("full", "lora-r4")),
            replace(QUICK_BUDGET, steps=8),
            (3.0,),
        ),
    ),
)


def run(out, quick: bool, command: str) -> dict:
    plan = QUICK if quick else FULL
    threads = torch.get_num_threads()
    if quick:
        torch.set_num_threads(1)  # smoke-sized models: a second thread only adds contention on a shared machine
    try:
        return _run(plan, out, quick, command)
    finally:
        torch.set_num_threads(threads)


def _run(plan: Plan, out, quick: bool, command: str) -> dict:
    report = Report("pretrain-limits", TITLE, command, quick)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
    jobs = list(plan.jobs())
    loaded: dict[str, corpora.Corpus] = {}
    total_steps = sum(b.ckpt_steps if m.checkpointing else b.steps for _, _, _, m, _, b, _ in jobs)
    runs = []
    with tqdm(total=total_steps, desc="pretrain-limits", unit="step") as bar:
        for series, corpus_name, size, method, rates, budget, scale in jobs:
            if corpus_name not in loaded:
                loaded[corpus_name] = corpora.load(corpus_name, plan.max_bytes)
            corpus = loaded[corpus_name]
            bar.set_postfix_str(
                f"{series} {corpus_name} {size.name} {method.key}" + (f" lr x{scale:.2g}" if scale != 1 else "")
            )
            windows = corpus.eval_windows(budget.context, plan.eval_windows)
            record = run_one(size, method, rates, budget, corpus, windows, bar)
            record.update({"corpus": corpus_name, "series": series, "lr_scale": scale, "rates": dict(rates.__dict__)})
            runs.append(record)
    results = {
        "plan": {
            "corpus": plan.corpus,
            "budget": plan.budget.__dict__ | {"tokens": plan.budget.tokens},
            "eval_windows": plan.eval_windows,
            "seeds": list(plan.seeds),
            "max_bytes": plan.max_bytes,
            "extra": plan.extra,
            "arms": [
                {"size": a.size.__dict__, "rates": a.rates.__dict__, "methods": list(a.methods)} for a in plan.arms
            ],
            "series": [
                {
                    "name": s.name,
                    "corpus": s.corpus,
                    "size": s.arm.size.name,
                    "methods": list(s.arm.methods),
                    "budget": s.budget.__dict__,
                    "lr_scales": list(s.lr_scales),
                    "seeds": list(s.seeds),
                }
                for s in plan.series
            ],
        },
        "corpora": {
            n: {"train_bytes": len(c.train), "held_out_bytes": len(c.held_out), "files": c.files}
            for n, c in loaded.items()
        },
        "runs": runs,
    }
    write_report(report, results, plan)
    report.write(out, results)
    return results
