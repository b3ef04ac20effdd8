"""pretrain-limits: why LoRA is a fine-tuning method and not a pre-training one, measured.

Llama-style byte-level models start from random weights and learn real text (Shakespeare's plays)
under each method of pretrain_methods.py: full-rank, LoRA-only (every weight frozen at its random
init, only the adapters learn), LoRA with trainable embeddings/norms/head, ReLoRA-style
merge-and-restart and GaLore-style gradient projection, plus gradient checkpointing for memory.

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

    def jobs(self):
        """(series, corpus, size, method, rates, budget, lr_scale) for every run, main grid first."""
        for arm in self.arms:
            for key in arm.methods:
                yield "main", self.corpus, arm.size, self.methods[key], arm.rates, self.budget, 1.0
        for s in self.series:
            for scale in s.lr_scales:
                for key in s.arm.methods:
                    yield s.name, s.corpus, s.arm.size, self.methods[key], s.arm.rates.scaled(scale), s.budget, scale


METHODS = {m.key: m for m in method_list(ranks=(8, 32), only_ranks=(8, 32), restart_rank=8)}
S64, S128, S256 = Size("0.2M", 64, 4, 2), Size("0.8M", 128, 4, 4), Size("3.3M", 256, 4, 8)
EVERY = ("full", "full+ckpt", "lora-only-r8", "lora-only-r32", "lora-r8", "lora-r32", "relora-r8", "galore-r8")
FULL_BUDGET = Budget(steps=400, batch=8, context=128, eval_points=8, relora_every=100, ckpt_steps=8)
# rates from the pilots below (0.8M and 3.3M; the report compares each chosen rate with its best pilot rate);
# 0.2M was not piloted, and the "lr" series (x1/3, x3 at 0.2M) shows whether its rates were fair for full-rank
# and both LoRA arms
R64 = Rates(full=3e-3, lora=3e-3, galore=1e-2, lora_only=3e-3)
R128 = Rates(full=3e-3, lora=1e-3, galore=1e-2, lora_only=3e-3)
R256 = Rates(full=1e-3, lora=1e-3, galore=1e-2, lora_only=3e-3)
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
    arms=(
        Arm(S64, R64, EVERY),
        Arm(S128, R128, EVERY),
        Arm(S256, R256, ("full", "full+ckpt", "lora-only-r8", "lora-r8")),
    ),
    budget=FULL_BUDGET,
    methods=METHODS,
    series=(
        Series(
            "longer",
            "shakespeare",
            Arm(S64, R64, ("full", "lora-only-r8", "lora-r8", "relora-r8", "galore-r8")),
            replace(FULL_BUDGET, steps=1200, relora_every=200),
        ),
        Series("lr", "shakespeare", Arm(S64, R64, ("full", "lora-only-r8", "lora-r8")), FULL_BUDGET, (1 / 3, 3.0)),
        Series("replicate", "python-stdlib", Arm(S64, R64, ("full", "lora-only-r8", "lora-r8")), FULL_BUDGET),
    ),
    extra={
        "pilots": [
            {"size": p[0], "method": p[1], "rate varied": p[2], "lr": p[3], "held-out loss, 200 steps": p[4]}
            for p in PILOTS
        ]
    },
)
QUICK_SIZE = Size("tiny", 32, 2, 2)
QUICK_METHODS = {m.key: m for m in method_list(ranks=(4,), only_ranks=(4,), restart_rank=4)}
QUICK_RATES = Rates(full=3e-3, lora=3e-3, galore=1e-2, galore_gap=6)
QUICK_BUDGET = Budget(steps=16, batch=8, context=64, eval_points=2, relora_every=6, ckpt_steps=3)
QUICK = Plan(
    arms=(Arm(QUICK_SIZE, QUICK_RATES, tuple(QUICK_METHODS)),),
    budget=QUICK_BUDGET,
    methods=QUICK_METHODS,
    eval_windows=8,
    max_bytes=400_000,
    series=(
        Series(
            "longer", "shakespeare", Arm(QUICK_SIZE, QUICK_RATES, ("full", "lora-r4")), replace(QUICK_BUDGET, steps=24)
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
